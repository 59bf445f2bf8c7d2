#!/bin/bash
#
# fake-devstack.sh - the devstack functions the rapid-vmm plugin calls,
# for a dry run without devstack (sourced by dry-run.sh).
#
# Every function records its call in $FD_LOG (one record per call: fields
# separated by \x1f, records ended by \x1e and a newline: process, phase,
# kind, name, arguments). kind is "q" for a query (no effect), "a" for an
# action, "f" for a refusal.
#
# Nothing is written outside $FD_SANDBOX: each function or command that
# writes checks its paths first, and a path outside the sandbox stops the
# dry run (marker file $FD_FAILED, exit 1). The plugin runs with PATH
# limited to $FD_SHIM_DIR (read-only tools), so any other program it would
# run is reported as unknown instead of being run.
#
# Required on entry: FD_SANDBOX FD_LOG FD_FAILED FD_STATE FD_REAL_PATH
# FD_BIN_DIR FD_PYTHON FD_PROCESS.

FD_PHASE=${FD_PHASE:-harness}

# _fd_real <command> <args> - run a real program, whatever PATH the plugin
# sees
function _fd_real {
    PATH=$FD_REAL_PATH command "$@"
}

# _fd_record <kind> <name> <args...>
function _fd_record {
    local field
    {
        printf '%s\x1f%s' "$FD_PROCESS" "$FD_PHASE"
        for field in "$@"; do
            printf '\x1f%s' "$field"
        done
        printf '\x1e\n'
    } >>"$FD_LOG"
}

# _fd_fail <message> - stop the dry run
function _fd_fail {
    _fd_record f fail "$*"
    printf 'DRY RUN FAILED [%s %s]: %s\n' "$FD_PROCESS" "$FD_PHASE" "$*" \
        >>"$FD_FAILED"
    printf 'DRY RUN FAILED [%s %s]: %s\n' "$FD_PROCESS" "$FD_PHASE" "$*" >&2
    exit 1
}

# _fd_inside <path> - true if path (resolved) is strictly inside the sandbox
function _fd_inside {
    local resolved
    resolved=$(_fd_real realpath -m -- "$1") || return 1
    [[ "$resolved" == "$FD_SANDBOX"/* ]]
}

# _fd_check_write <what> <path...> - refuse any path outside the sandbox
function _fd_check_write {
    local what=$1
    shift
    local path
    for path in "$@"; do
        if [[ -z "$path" ]]; then
            _fd_fail "$what: empty path"
        fi
        if ! _fd_inside "$path"; then
            _fd_fail "$what would write $path, outside the sandbox" \
                "$FD_SANDBOX"
        fi
    done
}

# Called by bash for a command that is neither a function nor in PATH
function command_not_found_handle {
    _fd_fail "the plugin ran '$*': not a devstack function the dry run" \
        "knows nor an allowed read-only tool"
}


# devstack: services and platform
# -------------------------------

function is_service_enabled {
    _fd_record q is_service_enabled "$@"
    local service
    for service in "$@"; do
        if [[ ",${ENABLED_SERVICES}," == *",${service},"* ]]; then
            return 0
        fi
        # devstack's catch-all names: "nova" is any n-*, "glance" any g-*...
        case "$service" in
            nova) [[ ",${ENABLED_SERVICES}" == *",n-"* ]] && return 0 ;;
            glance) [[ ",${ENABLED_SERVICES}" == *",g-"* ]] && return 0 ;;
            neutron) [[ ",${ENABLED_SERVICES}" == *",q-"* ]] && return 0 ;;
            cinder) [[ ",${ENABLED_SERVICES}" == *",c-"* ]] && return 0 ;;
            swift) [[ ",${ENABLED_SERVICES}" == *",s-"* ]] && return 0 ;;
        esac
    done
    return 1
}

function enable_service {
    _fd_record a enable_service "$@"
    local service
    for service in "$@"; do
        if [[ ",${DISABLED_SERVICES:-}," == *",${service},"* ]]; then
            continue
        fi
        if [[ ",${ENABLED_SERVICES}," != *",${service},"* ]]; then
            ENABLED_SERVICES+=",$service"
        fi
    done
}

function disable_service {
    _fd_record a disable_service "$@"
    local service
    for service in "$@"; do
        DISABLED_SERVICES="${DISABLED_SERVICES:-}${DISABLED_SERVICES:+,}$service"
        ENABLED_SERVICES=$(printf ',%s,' "$ENABLED_SERVICES" |
            _fd_real sed -e "s/,$service,/,/g" -e 's/^,//' -e 's/,$//')
    done
}

function define_plugin {
    _fd_record a define_plugin "$@"
}

function plugin_requires {
    _fd_record a plugin_requires "$@"
}

function is_ubuntu {
    _fd_record q is_ubuntu
    [[ "${FD_OS_PACKAGE:-deb}" == "deb" ]]
}

function is_fedora {
    _fd_record q is_fedora
    [[ "${FD_OS_PACKAGE:-deb}" == "rpm" ]]
}

# trueorfalse <default> <varname>
function trueorfalse {
    _fd_record q trueorfalse "$@"
    local default=$1
    local value=${!2:-}
    case "$value" in
        1|[yY]es|YES|[tT]rue|TRUE) echo True ;;
        0|[nN]o|NO|[fF]alse|FALSE) echo False ;;
        *) echo "$default" ;;
    esac
}

function get_python_exec_prefix {
    _fd_record q get_python_exec_prefix
    echo "$FD_BIN_DIR"
}

function echo_summary {
    echo "$@"
}

function die {
    local line=${1:-}
    shift || true
    _fd_record a die "$line" "$*"
    _fd_fail "die (line $line): $*"
}

function warn {
    _fd_record a warn "$@"
    echo "WARNING: $*" >&2
}

function install_package {
    _fd_record a install_package "$@"
}

function setup_develop {
    _fd_record a setup_develop "$@"
    if [[ ! -f "${1:-}/setup.cfg" ]]; then
        _fd_fail "setup_develop ${1:-}: no setup.cfg there"
    fi
}

function pip_install {
    _fd_record a pip_install "$@"
}

function add_user_to_group {
    _fd_record a add_user_to_group "$@"
}

function restart_service {
    _fd_record a restart_service "$@"
}

function run_process {
    _fd_record a run_process "$@"
}

function stop_process {
    _fd_record a stop_process "$@"
}

function get_or_create_user {
    _fd_record a get_or_create_user "$@"
    echo "fake-user-id-$1"
}

function get_or_add_user_project_role {
    _fd_record a get_or_add_user_project_role "$@"
    echo "fake-role-id-$1"
}

# get_transport_url [virtual_host]: the RabbitMQ of this devstack
function get_transport_url {
    _fd_record q get_transport_url "$@"
    if is_service_enabled rabbit ||
            [[ -n "${RABBIT_HOST:-}" && -n "${RABBIT_PASSWORD:-}" ]]; then
        echo "rabbit://$RABBIT_USERID:$RABBIT_PASSWORD@$RABBIT_HOST:5672/${1:-}"
    fi
}

# get_extra_file <url>: a cached download in $FILES; here a small dummy
function get_extra_file {
    _fd_record a get_extra_file "$@"
    local url=$1
    if [[ "$url" == file://* ]]; then
        echo "${url#file://}"
        return 0
    fi
    local path=${FILES:?}/${url##*/}
    _fd_check_write get_extra_file "$path"
    if [[ ! -f "$path" ]]; then
        _fd_real mkdir -p "$FILES"
        printf 'dummy image of the devstack dry run, from %s\n' "$url" \
            >"$path"
    fi
    echo "$path"
}


# devstack: configuration files
# -----------------------------
#
# Same behaviour as devstack's inc/ini-config: a missing file or section is
# created (the section at the end of the file), a missing option is added
# just after its section header, an existing option (uncommented, at the
# start of a line) is replaced in place; commented lines are left alone.

_FD_INI_AWK_COMMON='
    function is_header(line) { return line ~ /^\[[^]]*\]/ }
    function header_name(line) {
        sub(/^\[/, "", line); sub(/\].*$/, "", line); return line
    }
    function key_of(line,   i, k) {
        if (line ~ /^[ \t#;]/) return ""
        i = index(line, "=")
        if (i == 0) return ""
        k = substr(line, 1, i - 1)
        sub(/[ \t]+$/, "", k)
        return k
    }
'

# _fd_ini <action> <file> <section> <option> [value]
# (the awk programs are single-quoted on purpose)
# shellcheck disable=SC2016
function _fd_ini {
    local action=$1 file=$2 section=$3 option=$4 value=${5:-}
    local program
    case "$action" in
        get)
            program='
            is_header($0) { insec = (header_name($0) == S); next }
            insec && key_of($0) == K {
                v = substr($0, index($0, "=") + 1)
                sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
                print v; exit
            }'
            ;;
        comment)
            program='
            is_header($0) { insec = (header_name($0) == S) }
            insec && key_of($0) == K { print "#" $0; next }
            { print }'
            ;;
        delete)
            program='
            is_header($0) { insec = (header_name($0) == S) }
            insec && key_of($0) == K { next }
            { print }'
            ;;
        set)
            program='
            NR == FNR {
                if (is_header($0)) insec = (header_name($0) == S)
                else if (insec && key_of($0) == K) found = 1
                next
            }
            is_header($0) {
                insec = (header_name($0) == S)
                print
                if (insec) { seen = 1 }
                if (insec && !found && !added) { print K " = " V; added = 1 }
                next
            }
            insec && found && key_of($0) == K { print K " = " V; next }
            { print }
            END { if (!seen) printf "\n[%s]\n%s = %s\n", S, K, V }'
            ;;
    esac
    if [[ "$action" == "get" ]]; then
        [[ -f "$file" ]] || return 0
        FD_S=$section FD_K=$option _fd_real awk \
            "$_FD_INI_AWK_COMMON BEGIN { S = ENVIRON[\"FD_S\"]; K = ENVIRON[\"FD_K\"] } $program" \
            "$file"
        return 0
    fi
    [[ -f "$file" ]] || : >"$file"
    local files=("$file")
    if [[ "$action" == "set" ]]; then
        files=("$file" "$file")
    fi
    FD_S=$section FD_K=$option FD_V=$value _fd_real awk \
        "$_FD_INI_AWK_COMMON BEGIN { S = ENVIRON[\"FD_S\"]; K = ENVIRON[\"FD_K\"]; V = ENVIRON[\"FD_V\"] } $program" \
        "${files[@]}" >"$file.fd-tmp"
    _fd_real mv -f "$file.fd-tmp" "$file"
}

# iniset [-sudo] <file> <section> <option> <value>
function iniset {
    if [[ "${1:-}" == "-sudo" ]]; then
        shift
    fi
    _fd_record a iniset "$@"
    local file=$1 section=$2 option=$3 value=${4:-}
    if [[ -z "$section" || -z "$option" ]]; then
        return 0
    fi
    _fd_check_write iniset "$file" "$file.fd-tmp"
    _fd_ini set "$file" "$section" "$option" "$value"
}

# iniget <file> <section> <option>
function iniget {
    _fd_record q iniget "$@"
    _fd_ini get "$1" "$2" "$3"
}

# inicomment [-sudo] <file> <section> <option>
function inicomment {
    if [[ "${1:-}" == "-sudo" ]]; then
        shift
    fi
    _fd_record a inicomment "$@"
    _fd_check_write inicomment "$1" "$1.fd-tmp"
    _fd_ini comment "$1" "$2" "$3"
}

# inidelete [-sudo] <file> <section> <option>
function inidelete {
    if [[ "${1:-}" == "-sudo" ]]; then
        shift
    fi
    _fd_record a inidelete "$@"
    _fd_check_write inidelete "$1" "$1.fd-tmp"
    _fd_ini delete "$1" "$2" "$3"
}

# setup_logging <file>: devstack's logging options of a service (systemd
# journal formats, colours)
function setup_logging {
    _fd_record a setup_logging "$@"
    local conf=$1
    if [[ "$(trueorfalse False USE_JOURNAL)" == "True" ]]; then
        iniset "$conf" DEFAULT use_journal True
    fi
    iniset "$conf" DEFAULT logging_context_format_string \
        "%(color)s%(levelname)s %(name)s [%(global_request_id)s %(request_id)s %(project_name)s %(user_name)s%(color)s] %(instance)s%(color)s%(message)s"
    iniset "$conf" DEFAULT logging_default_format_string \
        "%(color)s%(levelname)s %(name)s [-%(color)s] %(instance)s%(color)s%(message)s"
    iniset "$conf" DEFAULT logging_debug_format_suffix \
        "{{(pid=%(process)d) %(funcName)s %(pathname)s:%(lineno)d}}"
    iniset "$conf" DEFAULT logging_exception_prefix "ERROR %(name)s %(instance)s"
    iniset "$conf" DEFAULT log_color "$LOG_COLOR"
}


# Commands that write: paths checked, then the real program
# ---------------------------------------------------------

# sudo [options] <command> <args>: only commands this file defines
function sudo {
    _fd_record a sudo "$@"
    while [[ "${1:-}" == -* ]]; do
        case "$1" in
            -u|-g|-C|-D|-h|-p|-r|-t|-U) shift 2 ;;
            *) shift ;;
        esac
    done
    if [[ "$(type -t "${1:-}")" != "function" ]]; then
        _fd_fail "sudo ${1:-}: not a command the dry run emulates"
    fi
    "$@"
}

# install [-d] [-o owner] [-g group] [-m mode] <paths>: owner and group are
# recorded, not applied (the stack user need not exist here)
function install {
    _fd_record a install "$@"
    local directories=0
    local args=()
    local paths=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -d|--directory) directories=1 ;;
            -o|-g) shift ;;
            --owner=*|--group=*) ;;
            -m) args+=("$1" "$2"); shift ;;
            --mode=*) args+=("$1") ;;
            -*) args+=("$1") ;;
            *) paths+=("$1") ;;
        esac
        shift
    done
    if [[ $directories == 1 ]]; then
        _fd_check_write install "${paths[@]}"
        _fd_real install -d "${args[@]}" "${paths[@]}"
    else
        _fd_check_write install "${paths[-1]}"
        _fd_real install "${args[@]}" "${paths[@]}"
    fi
}

# _fd_positional <args>: the arguments that are not options
function _fd_positional {
    local arg
    local options=1
    for arg in "$@"; do
        if [[ $options == 1 && "$arg" == "--" ]]; then
            options=0
        elif [[ $options == 1 && "$arg" == -* ]]; then
            continue
        else
            printf '%s\n' "$arg"
        fi
    done
}

function mkdir {
    _fd_record a mkdir "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write mkdir "${paths[@]}"
    _fd_real mkdir "$@"
}

function rm {
    _fd_record a rm "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write rm "${paths[@]}"
    _fd_real rm "$@"
}

function rmdir {
    _fd_record a rmdir "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write rmdir "${paths[@]}"
    _fd_real rmdir "$@"
}

function touch {
    _fd_record a touch "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write touch "${paths[@]}"
    _fd_real touch "$@"
}

function mv {
    _fd_record a mv "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write mv "${paths[@]}"
    _fd_real mv "$@"
}

# cp and ln read their sources anywhere and write the last path
function cp {
    _fd_record a cp "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write cp "${paths[-1]}"
    _fd_real cp "$@"
}

function ln {
    _fd_record a ln "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write ln "${paths[-1]}"
    _fd_real ln "$@"
}

function chmod {
    _fd_record a chmod "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write chmod "${paths[@]:1}"
    _fd_real chmod "$@"
}

# chown: checked and recorded, not applied
function chown {
    _fd_record a chown "$@"
    local paths
    mapfile -t paths < <(_fd_positional "$@")
    _fd_check_write chown "${paths[@]:1}"
}

function tee {
    _fd_record a tee "$@"
    local paths path
    mapfile -t paths < <(_fd_positional "$@")
    for path in "${paths[@]}"; do
        if [[ "$path" != /dev/null ]]; then
            _fd_check_write tee "$path"
        fi
    done
    _fd_real tee "$@"
}

# oslo-config-generator: really run (from the Python environment under
# test), after its output file is checked
function oslo-config-generator {
    _fd_record a oslo-config-generator "$@"
    local arg output=""
    local previous=""
    for arg in "$@"; do
        case "$previous" in
            --output-file|--output_file) output=$arg ;;
        esac
        case "$arg" in
            --output-file=*|--output_file=*) output=${arg#*=} ;;
        esac
        previous=$arg
    done
    if [[ -n "$output" ]]; then
        _fd_check_write oslo-config-generator "$output"
    fi
    PYTHONDONTWRITEBYTECODE=1 _fd_real "$FD_BIN_DIR/oslo-config-generator" "$@"
}


# python3 (devstack's $PYTHON): the plugin may run only rapid-vmm's parser
# of the grid of VM types with it, which really runs (the Python under test,
# with the repository under test first on its path, as setup_develop would
# install it); it only reads
function python3 {
    _fd_record q python3 "$@"
    if [[ $# -ne 3 || "$1" != "-m" || "$2" != "rapid_vmm.flavors" ]]; then
        _fd_fail "the plugin ran 'python3 $*': only 'python3 -m" \
            "rapid_vmm.flavors GRID' is allowed"
    fi
    PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$FD_REPO${PYTHONPATH:+:$PYTHONPATH}" \
        _fd_real "$FD_PYTHON" "$@"
}


# OpenStack client and virsh, with a little state in $FD_STATE
# -------------------------------------------------------------

# Options of the openstack client that take no value
_FD_OS_FLAGS=" --public --private --ingress --egress --or-show --all --name --managed-save "

# _fd_os_parse <args>: sets _FD_OPTS (an associative array, option -> last
# value) and _FD_POS (positional arguments)
function _fd_os_parse {
    declare -gA _FD_OPTS=()
    _FD_POS=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --*=*) _FD_OPTS[${1%%=*}]=${1#*=} ;;
            -*)
                if [[ "$_FD_OS_FLAGS" == *" $1 "* ]]; then
                    _FD_OPTS[$1]=1
                else
                    _FD_OPTS[$1]=${2:-}
                    shift
                fi
                ;;
            *) _FD_POS+=("$1") ;;
        esac
        shift
    done
}

function _fd_is_int {
    [[ "${1:-}" =~ ^[1-9][0-9]*$ ]]
}

function openstack {
    _fd_record a openstack "$@"
    # global options first: --os-region-name X, --os-cloud=X ...
    while [[ "${1:-}" == --os-* ]]; do
        if [[ "$1" == *=* ]]; then
            shift
        else
            shift 2
        fi
    done
    local command="${1:-} ${2:-}"
    local state=$FD_STATE/openstack
    _fd_real mkdir -p "$state/flavor" "$state/sg" "$state/rule"
    case "$command" in
        "flavor show")
            shift 2
            _fd_os_parse "$@"
            [[ -f "$state/flavor/${_FD_POS[0]}" ]] && return 0
            echo "No Flavor found for ${_FD_POS[0]}" >&2
            return 1
            ;;
        "flavor list")
            _fd_real ls "$state/flavor"
            ;;
        "flavor create")
            shift 2
            _fd_os_parse "$@"
            local name=${_FD_POS[0]:-}
            [[ ${#_FD_POS[@]} -eq 1 ]] || _fd_fail "openstack flavor create: one name expected, got '${_FD_POS[*]}'"
            local option
            for option in --vcpus --ram --disk; do
                _fd_is_int "${_FD_OPTS[$option]:-}" ||
                    _fd_fail "openstack flavor create $name: $option '${_FD_OPTS[$option]:-}' is not a positive integer"
            done
            if [[ -f "$state/flavor/$name" ]]; then
                echo "Conflict: flavor $name already exists" >&2
                return 1
            fi
            printf '%s %s %s\n' "${_FD_OPTS[--vcpus]}" "${_FD_OPTS[--ram]}" \
                "${_FD_OPTS[--disk]}" >"$state/flavor/$name"
            ;;
        "security group")
            local sub=${3:-}
            shift 3
            _fd_os_parse "$@"
            local project=${_FD_OPTS[--project]:-admin}
            case "$sub" in
                list)
                    if [[ -d "$state/sg/$project" ]]; then
                        _fd_real cat "$state/sg/$project"/* 2>/dev/null |
                            _fd_real cut -d' ' -f2
                    fi
                    ;;
                create)
                    local name=${_FD_POS[0]:-}
                    [[ -n "$name" ]] || _fd_fail "openstack security group create: no name"
                    # Neutron allows two groups with one name: so does this
                    local id
                    id=sg-$RANDOM$RANDOM
                    _fd_real mkdir -p "$state/sg/$project"
                    printf '%s %s\n' "$id" "$name" >"$state/sg/$project/$id"
                    printf '%s\n' "$id"
                    ;;
                rule)
                    [[ "${_FD_POS[0]:-}" == "create" ]] || _fd_fail "openstack security group rule ${_FD_POS[0]:-}: not emulated"
                    local group=${_FD_POS[1]:-}
                    if ! _fd_real ls "$state/sg"/*/"$group" >/dev/null 2>&1; then
                        _fd_fail "openstack security group rule create: no group '$group'"
                    fi
                    local rule
                    rule="$group ${_FD_OPTS[--protocol]:-any} ${_FD_OPTS[--dst-port]:-any} ${_FD_OPTS[--ethertype]:-IPv4} ${_FD_OPTS[--egress]:+egress}"
                    if _fd_real grep -qxF -- "$rule" "$state/rule/all" 2>/dev/null; then
                        echo "Conflict: security group rule already exists" >&2
                        return 1
                    fi
                    printf '%s\n' "$rule" >>"$state/rule/all"
                    ;;
                *)
                    _fd_fail "openstack security group $sub: not emulated"
                    ;;
            esac
            ;;
        *)
            _fd_fail "openstack $*: not emulated by the dry run"
            ;;
    esac
}

# virsh [-c uri] list --all --name | destroy <dom> | undefine [...] <dom>;
# the domains are $FD_FAKE_DOMAINS (space separated) until undefined
function virsh {
    _fd_record a virsh "$@"
    if [[ "${1:-}" == "-c" ]]; then
        shift 2
    fi
    local domains=$FD_STATE/virsh-domains
    if [[ ! -f "$domains" ]]; then
        local names=()
        read -r -a names <<<"${FD_FAKE_DOMAINS:-}"
        printf '%s\n' "${names[@]}" >"$domains"
    fi
    local sub=${1:-}
    shift || true
    _fd_os_parse "$@"
    case "$sub" in
        list)
            _fd_real cat "$domains"
            ;;
        destroy)
            _fd_real grep -qxF -- "${_FD_POS[0]:-}" "$domains"
            ;;
        undefine)
            _fd_real grep -qxF -- "${_FD_POS[0]:-}" "$domains" || return 1
            _fd_real grep -vxF -- "${_FD_POS[0]}" "$domains" >"$domains.new" || true
            _fd_real mv -f "$domains.new" "$domains"
            ;;
        *)
            _fd_fail "virsh $sub: not emulated by the dry run"
            ;;
    esac
}
