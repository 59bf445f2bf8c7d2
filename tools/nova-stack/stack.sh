#!/usr/bin/env bash
# A real, multi-process OpenStack compute stack on 127.0.0.1 for the Nova
# driver's integration tests: placement, glance, neutron (ML2, no agents),
# nova-api, nova-conductor, nova-scheduler and nova-compute (fake virt
# driver), on the machine's MariaDB and RabbitMQ.  Test use only: there is no
# Keystone, a token is just "user:project".  See README.md beside this file.
#
#   stack.sh install        venv with nova & co. (idempotent)
#   stack.sh start          fresh databases, start everything, seed, clouds.yaml
#   stack.sh stop           stop every process of this stack (~10 s at most)
#   stack.sh status         one line per service
#   stack.sh service-stop|service-start SERVICE   one service (tests)
#   stack.sh clean [--all]  stop, drop databases and vhost, remove the stack
#                           dir (keeping the venv unless --all)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

# ---------------------------------------------------------------- settings
STACK_DIR=$(realpath -m -- "${RAPID_NOVA_STACK_DIR:-$REPO_ROOT/.nova-stack}")
# Written by `install`; nothing is ever deleted from a directory without it.
STACK_MARKER=$STACK_DIR/.rapid-nova-stack-dir
VENV=$STACK_DIR/venv
ETC=$STACK_DIR/etc
DATA=$STACK_DIR/data
LOGS=$STACK_DIR/logs
RUN=$STACK_DIR/run

NOVA_PORT=${RAPID_NOVA_STACK_NOVA_PORT:-8774}
PLACEMENT_PORT=${RAPID_NOVA_STACK_PLACEMENT_PORT:-8778}
GLANCE_PORT=${RAPID_NOVA_STACK_GLANCE_PORT:-9292}
NEUTRON_PORT=${RAPID_NOVA_STACK_NEUTRON_PORT:-9696}

DB_HOST=${RAPID_NOVA_STACK_DB_HOST:-127.0.0.1}
DB_PORT=${RAPID_NOVA_STACK_DB_PORT:-3306}
DB_USER=${RAPID_NOVA_STACK_DB_USER:-root}
DB_PASSWORD=${RAPID_NOVA_STACK_DB_PASSWORD:-}
DB_PREFIX=${RAPID_NOVA_STACK_DB_PREFIX:-rvmm_}

RABBIT_HOST=${RAPID_NOVA_STACK_RABBIT_HOST:-127.0.0.1}
RABBIT_PORT=${RAPID_NOVA_STACK_RABBIT_PORT:-5672}
RABBIT_USER=${RAPID_NOVA_STACK_RABBIT_USER:-guest}
RABBIT_PASSWORD=${RAPID_NOVA_STACK_RABBIT_PASSWORD:-guest}
RABBIT_VHOST=${RAPID_NOVA_STACK_RABBIT_VHOST:-rapid_nova_stack}

COMPUTE_HOST=${RAPID_NOVA_STACK_COMPUTE_HOST:-rapid-nova-host}
CLOUD_NAME=${RAPID_NOVA_STACK_CLOUD:-rapid-nova-test}
NETWORK_NAME=${RAPID_NOVA_STACK_NETWORK:-rapid-net}
NETWORK_CIDR=${RAPID_NOVA_STACK_CIDR:-10.99.0.0/24}
PHYSNET=physnet1
IMAGES=(rapid-linux rapid-linux-helper)

INSTALL_TIMEOUT=${RAPID_NOVA_STACK_INSTALL_TIMEOUT:-1800}
START_TIMEOUT=${RAPID_NOVA_STACK_START_TIMEOUT:-180}
STOP_TIMEOUT=${RAPID_NOVA_STACK_STOP_TIMEOUT:-8}
SETUP_TIMEOUT=${RAPID_NOVA_STACK_SETUP_TIMEOUT:-300}
# Settings end up in config files, SQL and URLs: accept plain values only.
bad_setting() {
    printf 'ERROR: bad value for %s (see RAPID_NOVA_STACK_*): %q\n' \
        "$1" "${!1}" >&2
    exit 2
}
for _v in INSTALL_TIMEOUT START_TIMEOUT STOP_TIMEOUT SETUP_TIMEOUT \
    NOVA_PORT PLACEMENT_PORT GLANCE_PORT NEUTRON_PORT DB_PORT RABBIT_PORT; do
    [[ ${!_v} =~ ^[0-9]+$ ]] || bad_setting "$_v"
done
for _v in DB_PREFIX RABBIT_VHOST COMPUTE_HOST CLOUD_NAME NETWORK_NAME \
    DB_HOST RABBIT_HOST; do
    [[ ${!_v} =~ ^[A-Za-z0-9_.-]*$ ]] || bad_setting "$_v"
done
[[ $NETWORK_CIDR =~ ^[0-9./]+$ ]] || bad_setting NETWORK_CIDR

PIP_REQS=(
    nova==34.0.0
    openstack-placement==16.0.0
    glance==33.0.0
    neutron==29.0.0
    gunicorn==27.0.1
    PyMySQL==1.2.4
)
if [[ -n ${RAPID_NOVA_STACK_PIP_REQS:-} ]]; then
    read -r -a PIP_REQS <<<"$RAPID_NOVA_STACK_PIP_REQS"
fi

DB_NOVA_API=${DB_PREFIX}nova_api
DB_NOVA_CELL0=${DB_PREFIX}nova_cell0
DB_NOVA_CELL1=${DB_PREFIX}nova_cell1
DB_PLACEMENT=${DB_PREFIX}placement
DB_GLANCE=${DB_PREFIX}glance
DB_NEUTRON=${DB_PREFIX}neutron
ALL_DBS=(
    "$DB_NOVA_API" "$DB_NOVA_CELL0" "$DB_NOVA_CELL1"
    "$DB_PLACEMENT" "$DB_GLANCE" "$DB_NEUTRON"
)

# Start order matters little (every service retries), but the APIs first
# lets nova-compute find placement on its first try.
SERVICES=(
    placement glance neutron nova-api
    nova-conductor nova-scheduler nova-compute
)

# Tokens (see rapid_nova_stack/auth.py): USER:PROJECT[:ROLES].
NOVA_ADMIN_TOKEN=nova:service:admin,service,member,reader
NOVA_SERVICE_TOKEN=nova:service:service
PLACEMENT_TOKEN=admin:service

# The marker every process of this stack carries in its environment, so
# that `stop` also finds processes whose pid file was lost.
MARK="RAPID_NOVA_STACK_MARK=$STACK_DIR"

# ----------------------------------------------------------------- helpers
say() { printf '%s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }
# Time in integer milliseconds (bash 5's EPOCHREALTIME, no fork).
now() {
    local t=${EPOCHREALTIME/[.,]/}
    printf '%s' "$((10#$t / 1000))"
}
# Seconds since $1 (from now), with one decimal.
since() {
    local d
    d=$(($(now) - $1))
    printf '%d.%d' "$((d / 1000))" "$((d % 1000 / 100))"
}
# now + $1 whole seconds; past DEADLINE is true once it has passed.
deadline_in() { printf '%s' "$(($(now) + $1 * 1000))"; }
past() { (($(now) > $1)); }

# -P: never import the helper from the current directory (a checkout), only
# the copy installed in the venv.
ctl() { "$VENV/bin/python" -P -m rapid_nova_stack.ctl "$@"; }

export_ctl_env() {
    export RNS_NOVA_PORT=$NOVA_PORT RNS_PLACEMENT_PORT=$PLACEMENT_PORT
    export RNS_GLANCE_PORT=$GLANCE_PORT RNS_NEUTRON_PORT=$NEUTRON_PORT
    export RNS_DB_HOST=$DB_HOST RNS_DB_PORT=$DB_PORT RNS_DB_USER=$DB_USER
    export RNS_DB_PASSWORD=$DB_PASSWORD RNS_DB_NOVA_API=$DB_NOVA_API
    export RNS_DB_NOVA_CELL1=$DB_NOVA_CELL1
    export RNS_COMPUTE_HOST=$COMPUTE_HOST RNS_RUN_DIR=$RUN RNS_LOG_DIR=$LOGS
}

urlquote() {
    local code='import sys, urllib.parse as p;'
    code+=' print(p.quote(sys.argv[1], safe=""))'
    "$VENV/bin/python" -c "$code" "$1"
}

# Does something accept TCP connections on host $1 port $2? (bounded)
tcp_open() {
    # shellcheck disable=SC2016  # $1 and $2 expand in the inner bash
    timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}
port_busy() { tcp_open 127.0.0.1 "$1"; }
rabbit_answers() { tcp_open "$RABBIT_HOST" "$RABBIT_PORT"; }

pid_of() {
    local f=$RUN/$1.pid
    [[ -f $f ]] || return 1
    local pid
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    printf '%s' "$pid"
}

# True while process group $1 has a live (non-zombie) member.  Reads
# /proc with shell builtins only (no fork per process).
group_alive() {
    local stat line state pgrp
    for stat in /proc/[0-9]*/stat; do
        { read -r line <"$stat"; } 2>/dev/null || continue
        # after "pid (comm) ": state ppid pgrp ...
        read -r state _ pgrp _ <<<"${line##*) }"
        if [[ $pgrp == "$1" && $state != Z ]]; then
            return 0
        fi
    done
    return 1
}

# Pids of live processes carrying this stack's marker in their environment
# (ours even if a pid file was lost).
marked_pids() {
    local f pid line state
    while IFS= read -r f; do
        pid=${f#/proc/}
        pid=${pid%/environ}
        { read -r line <"/proc/$pid/stat"; } 2>/dev/null || continue
        read -r state _ <<<"${line##*) }"
        [[ $state == Z ]] && continue
        printf '%s\n' "$pid"
    done < <(grep -lzxF -- "$MARK" /proc/[0-9]*/environ 2>/dev/null || true)
}

tail_log() {
    say "---- last lines of $1 ----" >&2
    tail -n "${2:-30}" "$1" >&2 2>/dev/null || true
    say "----" >&2
}

STAMP=$VENV/.rapid-nova-stack-stamp

need_venv() {
    [[ -f $STACK_MARKER && -x $VENV/bin/python && -f $STAMP ]] ||
        die "no stack venv at $VENV: run '$SELF install' first"
}

# Refuse directories that stack.sh did not create: start and clean delete
# things under the stack dir.
claim_stack_dir() {
    case $STACK_DIR in
        / | /root | /home | /tmp | /usr | /var | /etc | "$HOME" | "$REPO_ROOT")
            die "refusing RAPID_NOVA_STACK_DIR=$STACK_DIR (not dedicated)"
            ;;
    esac
    local ours=0
    [[ -f $STACK_MARKER || -f $STAMP || ! -d $STACK_DIR ]] && ours=1
    [[ -d $STACK_DIR && -z $(ls -A "$STACK_DIR") ]] && ours=1
    if ((!ours)); then
        die "$STACK_DIR is not empty and not made by stack.sh: refused"
    fi
    mkdir -p "$STACK_DIR"
    printf 'rapid-vmm nova test stack (tools/nova-stack)\n' >"$STACK_MARKER"
    # Keep git status clean wherever the stack dir lives inside a checkout.
    [[ -f $STACK_DIR/.gitignore ]] || printf '*\n' >"$STACK_DIR/.gitignore"
}

# -------------------------------------------------------------- install
helper_hash() {
    (cd "$SCRIPT_DIR" &&
        find pyproject.toml rapid_nova_stack -name '*.py' -o -name '*.toml' |
        LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -d' ' -f1
}

pick_python() {
    local py=${RAPID_NOVA_STACK_PYTHON:-}
    if [[ -z $py ]]; then
        py=$(command -v python3.11 || command -v python3 || true)
    fi
    [[ -n $py ]] || die "no python3.11 found (set RAPID_NOVA_STACK_PYTHON)"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$py is older than 3.11 (nova 34 needs >= 3.11)"
    "$py" -c 'import ensurepip, venv' 2>/dev/null ||
        die "$py cannot create venvs (Debian: apt-get install python3-venv)"
    printf '%s' "$py"
}

# pip, minus one harmless warning that some pip configurations print per
# package (extra index URLs that point at absent local directories).
PIP_NOISE='is ignored: it is neither a file nor a directory'
pip_install() {
    local rc=0
    timeout "$INSTALL_TIMEOUT" "$VENV/bin/pip" install "$@" 2>&1 |
        { grep -v -e "$PIP_NOISE" || true; } || rc=$?
    return "$rc"
}

install_helper() {
    # Build from a copy: setuptools would leave build/ and *.egg-info in
    # the source tree otherwise.
    local src
    src=$(mktemp -d "${TMPDIR:-/tmp}/rapid-nova-stack-src.XXXXXX")
    cp -r "$SCRIPT_DIR/pyproject.toml" "$SCRIPT_DIR/rapid_nova_stack" "$src/"
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    local rc=0
    pip_install -q --no-deps --force-reinstall "$src" || rc=$?
    rm -rf "$src"
    return "$rc"
}

# Is the venv there, built for these requirements, and importable?
venv_matches() {
    [[ -f $STAMP && $(sed -n 1p "$STAMP") == "$1" ]] || return 1
    local mods='nova, neutron, glance, placement, gunicorn, pymysql'
    "$VENV/bin/python" -c "import $mods" 2>/dev/null
}

# Versions of every package of the stack venv, so a PyPI release cannot
# break the stack between two CI runs (regenerate with pip freeze).
CONSTRAINTS=${RAPID_NOVA_STACK_CONSTRAINTS:-$SCRIPT_DIR/constraints.txt}

constraints_hash() {
    sha256sum "$CONSTRAINTS" | cut -c1-16
}

cmd_install() {
    local t0 py pyver stamp_reqs stamp_helper
    t0=$(now)
    py=$(pick_python)
    pyver=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    stamp_reqs="python=$pyver ${PIP_REQS[*]} constraints=$(constraints_hash)"
    stamp_helper=$(helper_hash)
    claim_stack_dir

    if venv_matches "$stamp_reqs"; then
        if [[ $(sed -n 2p "$STAMP") == "$stamp_helper" ]]; then
            say "stack venv up to date ($VENV): ${PIP_REQS[*]}"
            return 0
        fi
        say "updating the rapid_nova_stack helper package in $VENV"
        install_helper
        printf '%s\n%s\n' "$stamp_reqs" "$stamp_helper" >"$STAMP"
        say "install done in $(since "$t0") s"
        return 0
    fi

    if [[ -d $VENV ]]; then
        say "recreating $VENV (different versions or incomplete)"
        rm -rf "$VENV"
    fi
    say "creating $VENV with $py ($pyver)"
    "$py" -m venv "$VENV"
    pip_install -q --upgrade pip
    say "pip install ${PIP_REQS[*]} (about 1.5 min)"
    pip_install -q -c "$CONSTRAINTS" "${PIP_REQS[@]}"
    install_helper
    printf '%s\n%s\n' "$stamp_reqs" "$stamp_helper" >"$STAMP"
    say "install done in $(since "$t0") s ($(du -sh "$VENV" | cut -f1))"
}

# ---------------------------------------------------------------- config
db_url() {
    local user pass
    user=$(urlquote "$DB_USER")
    pass=$(urlquote "$DB_PASSWORD")
    printf 'mysql+pymysql://%s:%s@%s:%s/%s?charset=utf8mb4' \
        "$user" "$pass" "$DB_HOST" "$DB_PORT" "$1"
}

transport_url() {
    local user pass vhost
    user=$(urlquote "$RABBIT_USER")
    pass=$(urlquote "$RABBIT_PASSWORD")
    vhost=$(urlquote "$RABBIT_VHOST")
    printf 'rabbit://%s:%s@%s:%s/%s' "$user" "$pass" "$RABBIT_HOST" \
        "$RABBIT_PORT" "$vhost"
}

# Copy an installed api-paste file, pointing its authtoken filter at ours.
paste_with_our_auth() {
    local src=$1 dst=$2
    [[ -f $src ]] || die "missing $src (broken venv? clean --all, install)"
    local theirs='keystonemiddleware.auth_token:filter_factory'
    local ours='rapid_nova_stack.auth:filter_factory'
    local expr="s|^paste.filter_factory *= *$theirs *\$|"
    expr+="paste.filter_factory = $ours|"
    sed "$expr" "$src" >"$dst"
    if grep -q "$theirs" "$dst" || ! grep -q "$ours" "$dst"; then
        die "could not replace the authtoken filter in $src"
    fi
}

write_config() {
    local transport
    transport=$(transport_url)
    mkdir -p "$ETC"/{nova,neutron,glance,placement} \
        "$DATA"/nova/instances "$DATA"/nova/locks \
        "$DATA"/glance/{images,staging,tasks} "$DATA"/neutron/locks \
        "$LOGS" "$RUN"

    cat >"$ETC/placement/placement.conf" <<EOF
[DEFAULT]
debug = False

[api]
auth_strategy = noauth2

[placement_database]
connection = $(db_url "$DB_PLACEMENT")
EOF

    paste_with_our_auth "$VENV/etc/glance/glance-api-paste.ini" \
        "$ETC/glance/glance-api-paste.ini"
    cat >"$ETC/glance/glance-api.conf" <<EOF
[DEFAULT]
debug = False
bind_host = 127.0.0.1
bind_port = $GLANCE_PORT
enabled_backends = fs:file
worker_self_reference_url = http://127.0.0.1:$GLANCE_PORT
transport_url = $transport

[database]
connection = $(db_url "$DB_GLANCE")

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = $DATA/glance/images/

[os_glance_staging_store]
filesystem_store_datadir = $DATA/glance/staging/

[os_glance_tasks_store]
filesystem_store_datadir = $DATA/glance/tasks/

[paste_deploy]
flavor = keystone
config_file = $ETC/glance/glance-api-paste.ini

[oslo_messaging_notifications]
driver = noop

[oslo_concurrency]
lock_path = $DATA/glance
EOF

    paste_with_our_auth "$VENV/etc/neutron/api-paste.ini" \
        "$ETC/neutron/api-paste.ini"
    cat >"$ETC/neutron/neutron.conf" <<EOF
[DEFAULT]
debug = False
host = $COMPUTE_HOST
bind_host = 127.0.0.1
bind_port = $NEUTRON_PORT
auth_strategy = keystone
api_paste_config = $ETC/neutron/api-paste.ini
core_plugin = ml2
service_plugins =
state_path = $DATA/neutron
transport_url = $transport
# No nova credentials here: port events are not sent to nova.  The fake
# virt driver does not wait for vif-plugged events.
notify_nova_on_port_status_changes = False
notify_nova_on_port_data_changes = False

[database]
connection = $(db_url "$DB_NEUTRON")

[ml2]
type_drivers = flat
project_network_types =
mechanism_drivers = rapid_bind
extension_drivers = port_security

[ml2_type_flat]
flat_networks = $PHYSNET

[securitygroup]
enable_security_group = True

[oslo_concurrency]
lock_path = $DATA/neutron/locks

[oslo_messaging_notifications]
driver = noop
EOF

    paste_with_our_auth "$VENV/etc/nova/api-paste.ini" \
        "$ETC/nova/api-paste.ini"
    cat >"$ETC/nova/nova.conf" <<EOF
[DEFAULT]
debug = False
host = $COMPUTE_HOST
my_ip = 127.0.0.1
state_path = $DATA/nova
instances_path = $DATA/nova/instances
transport_url = $transport
compute_driver = fake.FakeDriverWithoutFakeNodes
allow_resize_to_same_host = True
periodic_fuzzy_delay = 0
graceful_shutdown_timeout = 5

[quota]
# One VM per user and many users: keep quotas out of the tests' way.
instances = 1000
cores = 10000
ram = 10240000

[wsgi]
api_paste_config = $ETC/nova/api-paste.ini

[scheduler]
discover_hosts_in_cells_interval = 2
workers = 1

[conductor]
workers = 1

[placement]
auth_type = admin_token
endpoint = http://127.0.0.1:$PLACEMENT_PORT
token = $PLACEMENT_TOKEN

[glance]
endpoint_override = http://127.0.0.1:$GLANCE_PORT

[neutron]
auth_type = admin_token
endpoint = http://127.0.0.1:$NEUTRON_PORT
token = $NOVA_ADMIN_TOKEN
endpoint_override = http://127.0.0.1:$NEUTRON_PORT

[service_user]
send_service_user_token = True
auth_type = admin_token
endpoint = http://127.0.0.1:$NOVA_PORT
token = $NOVA_SERVICE_TOKEN

[vnc]
enabled = False

[oslo_concurrency]
lock_path = $DATA/nova/locks

[oslo_messaging_notifications]
driver = noop
EOF

    # Database access, for every nova service except nova-compute (which
    # must go through the conductor and logs errors if it has DB access).
    cat >"$ETC/nova/nova-db.conf" <<EOF
[api_database]
connection = $(db_url "$DB_NOVA_API")

[database]
connection = $(db_url "$DB_NOVA_CELL1")
EOF
}

# --------------------------------------------------------- setup steps
# Run one setup step in the background, its output into logs/setup-NAME.log.
SETUP_PIDS=()
SETUP_NAMES=()
setup_step() {
    local name=$1
    shift
    (
        t=$(now)
        rc=0
        env PATH="$VENV/bin:$PATH" timeout "$SETUP_TIMEOUT" "$@" || rc=$?
        printf '== setup step %s: exit %s after %s s\n' \
            "$name" "$rc" "$(since "$t")"
        exit "$rc"
    ) >"$LOGS/setup-$name.log" 2>&1 </dev/null &
    SETUP_PIDS+=("$!")
    SETUP_NAMES+=("$name")
}

setup_wait() {
    local i rc failed=0
    for i in "${!SETUP_PIDS[@]}"; do
        rc=0
        wait "${SETUP_PIDS[$i]}" || rc=$?
        if ((rc != 0)); then
            printf 'ERROR: setup step %s failed (exit %s)\n' \
                "${SETUP_NAMES[$i]}" "$rc" >&2
            tail_log "$LOGS/setup-${SETUP_NAMES[$i]}.log" 40
            failed=1
        fi
    done
    SETUP_PIDS=()
    SETUP_NAMES=()
    return "$failed"
}

rabbit_drop_vhost() {
    timeout 60 rabbitmqctl -q delete_vhost "$RABBIT_VHOST" >/dev/null 2>&1 ||
        true
}

rabbit_reset() {
    command -v rabbitmqctl >/dev/null ||
        die "rabbitmqctl not found: it is needed to create vhost $RABBIT_VHOST"
    rabbit_drop_vhost
    timeout 60 rabbitmqctl -q add_vhost "$RABBIT_VHOST"
    timeout 60 rabbitmqctl -q set_permissions -p "$RABBIT_VHOST" \
        "$RABBIT_USER" '.*' '.*' '.*'
}

# What nova-manage api_db sync, cell_v2 map_cell0, cell_v2 create_cell and
# db sync do, in one Python process (see rapid_nova_stack/nova_db.py).
nova_db_setup() {
    "$VENV/bin/python" -P -m rapid_nova_stack.nova_db \
        "$(db_url "$DB_NOVA_CELL0")" \
        --config-file "$ETC/nova/nova.conf" \
        --config-file "$ETC/nova/nova-db.conf"
}

# --------------------------------------------------------------- services
start_service() {
    local name=$1
    shift
    : >"$LOGS/$name.log"
    # setsid: each service leads its own process group, so `stop` can
    # signal a gunicorn master and its worker together.  The subshell only
    # changes directory and execs, so $! is the service's own pid.
    (
        cd "$STACK_DIR"
        exec setsid env "$MARK" PATH="$VENV/bin:$PATH" \
            OS_NOVA_CONFIG_DIR="$ETC/nova" \
            OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf;nova-db.conf" \
            OS_NEUTRON_CONFIG_DIR="$ETC/neutron" \
            OS_NEUTRON_CONFIG_FILES=neutron.conf \
            OS_GLANCE_CONFIG_DIR="$ETC/glance" \
            OS_PLACEMENT_CONFIG_DIR="$ETC/placement" \
            "$@"
    ) >>"$LOGS/$name.log" 2>&1 </dev/null &
    printf '%s\n' "$!" >"$RUN/$name.pid"
}

gunicorn_service() {
    local name=$1 port=$2 module=$3
    start_service "$name" "$VENV/bin/gunicorn" --no-control-socket \
        --chdir "$STACK_DIR" \
        --workers 1 --threads 4 --bind "127.0.0.1:$port" \
        --timeout 120 --graceful-timeout 5 \
        --access-logfile - \
        --access-logformat '%(h)s "%(r)s" %(s)s %(b)s %(M)sms' \
        "rapid_nova_stack.wsgi.$module:application"
}

start_one() {
    case $1 in
        placement) gunicorn_service "$1" "$PLACEMENT_PORT" placement_api ;;
        glance) gunicorn_service "$1" "$GLANCE_PORT" glance_api ;;
        neutron) gunicorn_service "$1" "$NEUTRON_PORT" neutron_api ;;
        nova-api) gunicorn_service "$1" "$NOVA_PORT" nova_api ;;
        nova-conductor | nova-scheduler)
            start_service "$1" "$VENV/bin/$1" \
                --config-file "$ETC/nova/nova.conf" \
                --config-file "$ETC/nova/nova-db.conf"
            ;;
        nova-compute)
            start_service "$1" "$VENV/bin/$1" \
                --config-file "$ETC/nova/nova.conf"
            ;;
        *) die "unknown service $1 (one of: ${SERVICES[*]})" ;;
    esac
}

start_all_services() {
    local svc
    for svc in "${SERVICES[@]}"; do
        [[ $svc == nova-compute ]] || start_one "$svc"
    done
    # nova-compute pings nova-conductor once at start and, if nobody
    # listens yet, waits 10 s before trying again: start it once the
    # conductor has registered (a few seconds; the rest keeps booting).
    ctl wait-registered nova-conductor --timeout "$START_TIMEOUT" || return 1
    start_one nova-compute
}

running_services() {
    local svc pid
    for svc in "${SERVICES[@]}"; do
        if pid=$(pid_of "$svc") && group_alive "$pid"; then
            printf '%s\n' "$svc"
        fi
    done
}

# ----------------------------------------------------------------- start
cmd_start() {
    need_venv
    local t0 t
    t0=$(now)
    export_ctl_env

    ctl db-ping || die "MariaDB is needed (RAPID_NOVA_STACK_DB_*)"
    rabbit_answers ||
        die "RabbitMQ does not answer on $RABBIT_HOST:$RABBIT_PORT"
    command -v rabbitmqctl >/dev/null ||
        die "rabbitmqctl not found: it is needed to create vhost $RABBIT_VHOST"
    if [[ -n $(running_services) || -n $(marked_pids) ]]; then
        say "stack is running: stopping it first"
        cmd_stop
    fi
    local port
    for port in "$NOVA_PORT" "$PLACEMENT_PORT" "$GLANCE_PORT" \
        "$NEUTRON_PORT"; do
        if port_busy "$port"; then
            die "127.0.0.1:$port is in use (see RAPID_NOVA_STACK_*_PORT)"
        fi
    done

    # Fresh state every time: databases are recreated, so old data goes too.
    rm -rf "$ETC" "$DATA" "$LOGS" "$RUN" "$STACK_DIR/clouds.yaml"
    write_config
    say "config written to $ETC"

    t=$(now)
    ctl db-reset "${ALL_DBS[@]}"
    setup_step rabbitmq "$SELF" _rabbit-reset
    setup_step placement-db placement-manage \
        --config-file "$ETC/placement/placement.conf" db sync
    setup_step glance-db glance-manage \
        --config-file "$ETC/glance/glance-api.conf" db_sync
    setup_step neutron-db neutron-db-manage \
        --config-file "$ETC/neutron/neutron.conf" upgrade heads
    setup_step nova-db "$SELF" _nova-db-setup
    setup_wait || die "setup failed; logs in $LOGS"
    say "databases (${DB_PREFIX}*) and vhost $RABBIT_VHOST ready" \
        "in $(since "$t") s"

    t=$(now)
    # From here on, leave nothing running if start fails or is interrupted.
    trap 'fail_start "interrupted"' INT TERM
    start_all_services || fail_start "services did not come up"
    say "services started; waiting for them (at most ${START_TIMEOUT} s)"
    if ! ctl wait --timeout "$START_TIMEOUT"; then
        fail_start "services did not come up"
    fi
    say "all services ready in $(since "$t") s"

    t=$(now)
    if ! ctl seed --images "${IMAGES[@]}" --network "$NETWORK_NAME" \
        --physnet "$PHYSNET" --cidr "$NETWORK_CIDR" --cloud "$CLOUD_NAME" \
        --clouds-yaml "$STACK_DIR/clouds.yaml"; then
        fail_start "seeding failed"
    fi
    trap - INT TERM
    say "seeded in $(since "$t") s"
    say ""
    say "Nova stack up in $(since "$t0") s. Use it with:"
    say "  export OS_CLIENT_CONFIG_FILE=$STACK_DIR/clouds.yaml"
    say "  export OS_CLOUD=$CLOUD_NAME   # admin; $CLOUD_NAME-demo is a plain member"
    say "  openstack.connect(cloud='$CLOUD_NAME')"
    say "Logs: $LOGS   Stop: $SELF stop"
}

fail_start() {
    trap - INT TERM
    printf 'ERROR: %s; logs in %s\n' "$1" "$LOGS" >&2
    if [[ ${RAPID_NOVA_STACK_KEEP_ON_FAILURE:-0} == 1 ]]; then
        say "processes left running (RAPID_NOVA_STACK_KEEP_ON_FAILURE=1)" >&2
    else
        cmd_stop >&2
    fi
    exit 1
}

# ------------------------------------------------------------------ stop

# Stop the named services: SIGTERM to each process group, SIGKILL after
# STOP_TIMEOUT seconds.  With --sweep, also every other process that
# carries this stack's marker.  Leaves the groups it signalled in
# STOP_GROUPS.
stop_services() {
    local sweep=0
    if [[ ${1:-} == --sweep ]]; then
        sweep=1
        shift
    fi
    local svc pid
    STOP_GROUPS=()
    for svc in "$@"; do
        if pid=$(pid_of "$svc") && group_alive "$pid"; then
            STOP_GROUPS+=("$pid")
            kill -TERM -- "-$pid" 2>/dev/null || true
        fi
    done
    if ((sweep)); then
        for pid in $(marked_pids); do
            kill -TERM "$pid" 2>/dev/null || true
        done
    fi
    if ! wait_gone "$sweep" "$STOP_TIMEOUT"; then
        say "still running after ${STOP_TIMEOUT} s: sending SIGKILL" >&2
        for pid in "${STOP_LEFT[@]}"; do
            kill -KILL -- "-$pid" 2>/dev/null || true
        done
        if ((sweep)); then
            for pid in $(marked_pids); do
                kill -KILL "$pid" 2>/dev/null || true
            done
        fi
        wait_gone "$sweep" 3 ||
            die "still alive after SIGKILL: groups ${STOP_LEFT[*]}" \
                "$(marked_pids | tr '\n' ' ')"
    fi
    for svc in "$@"; do
        rm -f "$RUN/$svc.pid"
    done
}

# Wait up to $2 seconds until every group in STOP_GROUPS is gone (and, if
# $1 is 1, every marked process).  Leaves the live groups in STOP_LEFT.
wait_gone() {
    local sweep=$1 deadline pid
    deadline=$(deadline_in "$2")
    while :; do
        STOP_LEFT=()
        for pid in "${STOP_GROUPS[@]}"; do
            if group_alive "$pid"; then STOP_LEFT+=("$pid"); fi
        done
        if ((${#STOP_LEFT[@]} == 0)); then
            if ((!sweep)) || [[ -z $(marked_pids) ]]; then
                return 0
            fi
        fi
        past "$deadline" && return 1
        sleep 0.1
    done
}

cmd_stop() {
    local t0
    t0=$(now)
    stop_services --sweep "${SERVICES[@]}"
    if ((${#STOP_GROUPS[@]} == 0)); then
        say "stack was not running"
    else
        say "stopped ${#STOP_GROUPS[@]} services in $(since "$t0") s"
    fi
}

# stack.sh service-stop NAME / service-start NAME: one service, for tests
# that need an API down (service-start waits until it answers again).
cmd_service_stop() {
    [[ $# -eq 1 ]] || die "usage: $SELF service-stop SERVICE"
    start_one_check "$1"
    stop_services "$1"
    say "$1 stopped"
}

cmd_service_start() {
    local pid
    [[ $# -eq 1 ]] || die "usage: $SELF service-start SERVICE"
    need_venv
    start_one_check "$1"
    export_ctl_env
    if pid=$(pid_of "$1") && group_alive "$pid"; then
        say "$1 is already running (pid $pid)"
        return 0
    fi
    [[ -f $ETC/nova/nova.conf ]] || die "no stack config: run '$SELF start'"
    start_one "$1"
    ctl wait --only "$1" --timeout "$START_TIMEOUT" ||
        die "$1 did not come back; see $LOGS/$1.log"
}

start_one_check() {
    local svc
    for svc in "${SERVICES[@]}"; do
        [[ $svc == "$1" ]] && return 0
    done
    die "unknown service $1 (one of: ${SERVICES[*]})"
}

# ---------------------------------------------------------------- status
cmd_status() {
    if [[ ! -x $VENV/bin/python || ! -f $STAMP ]]; then
        say "not installed (no complete venv at $VENV): run '$SELF install'"
        return 3
    fi
    export_ctl_env
    local rc=0
    ctl status || rc=$?
    [[ -f $STACK_DIR/clouds.yaml ]] &&
        say "clouds.yaml: $STACK_DIR/clouds.yaml (cloud $CLOUD_NAME)"
    return "$rc"
}

# ----------------------------------------------------------------- clean
cmd_clean() {
    local all=0
    case ${1:-} in
        --all) all=1 ;;
        '') ;;
        *) die "usage: $SELF clean [--all]" ;;
    esac
    cmd_stop
    local db
    if [[ -x $VENV/bin/python ]]; then
        export_ctl_env
        ctl db-drop "${ALL_DBS[@]}" ||
            say "warning: could not drop the databases"
    elif command -v mysql >/dev/null; then
        for db in "${ALL_DBS[@]}"; do
            MYSQL_PWD=$DB_PASSWORD timeout 30 mysql -h "$DB_HOST" \
                -P "$DB_PORT" -u "$DB_USER" \
                -e "DROP DATABASE IF EXISTS \`$db\`" ||
                say "warning: could not drop database $db"
        done
    else
        say "warning: no venv, no mysql client: ${DB_PREFIX}* databases kept"
    fi
    if command -v rabbitmqctl >/dev/null; then
        rabbit_drop_vhost
    fi
    if [[ ! -f $STACK_MARKER ]]; then
        say "no stack dir at $STACK_DIR (nothing else to remove)"
        return 0
    fi
    rm -rf "$ETC" "$DATA" "$LOGS" "$RUN" "$STACK_DIR/clouds.yaml"
    if ((all)); then
        rm -rf "$STACK_DIR"
        say "removed $STACK_DIR"
    else
        say "cleaned $STACK_DIR (venv kept; 'clean --all' removes it)"
    fi
}

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        install) cmd_install "$@" ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        service-stop) cmd_service_stop "$@" ;;
        service-start) cmd_service_start "$@" ;;
        status) cmd_status "$@" ;;
        clean) cmd_clean "$@" ;;
        # Internal: setup steps that `start` runs in parallel under timeout.
        _rabbit-reset) rabbit_reset ;;
        _nova-db-setup) need_venv; nova_db_setup ;;
        -h | --help | help) usage ;;
        *)
            say "unknown command: ${cmd:-(none)}" >&2
            usage >&2
            exit 2
            ;;
    esac
}

# One line, so bash has read it whole before running it: editing this file
# while a command runs cannot make bash execute a half-read tail.
main "$@"; exit "$?"
