#!/bin/bash
#
# devstack/plugin.sh - devstack plugin of rapid-vmm, the RAPID VM Manager
#
# devstack sources this file as `plugin.sh <mode> [<phase>]`: mode "stack"
# with the phases pre-install, install, post-config, extra (and
# test-config, unused here), then "unstack" and "clean". devstack/settings
# has been sourced before; every RAPID_VMM_* variable comes from it.
#
# Every file this plugin writes goes through devstack functions (iniset,
# get_extra_file) or a command run with sudo/cp, never through a shell
# redirection: tools/devstack-check/run.sh relies on that to dry-run it.

# Save trace setting
_XTRACE_RAPID_VMM=$(set +o | grep xtrace)
set -o xtrace


# Functions
# ---------

# rapid_vmm_check_settings - refuse bad RAPID_VMM_* values before doing
# anything (the grid of VM types is checked by rapid_vmm_load_vm_types, with
# the agent's own parser, once rapid-vmm is installed)
function rapid_vmm_check_settings {
    case "$RAPID_VMM_COMPUTE_DRIVER" in
        auto|nova|libvirt) ;;
        *)
            die $LINENO "RAPID_VMM_COMPUTE_DRIVER must be auto, nova or" \
                "libvirt, not '$RAPID_VMM_COMPUTE_DRIVER'"
            ;;
    esac
    case "$RAPID_VMM_NOVA_AUTH" in
        admin|service) ;;
        *)
            die $LINENO "RAPID_VMM_NOVA_AUTH must be admin or service," \
                "not '$RAPID_VMM_NOVA_AUTH'"
            ;;
    esac
}

# rapid_vmm_load_vm_types - the types of RAPID_VMM_VM_TYPES, from the
# agent's own parser of the grid (python -m rapid_vmm.flavors, installed
# by now), into _RAPID_VMM_TYPES: one "key vcpus memory_mb disk_gb" entry
# per type (key: vcpus_memoryMB_diskGB, the keys of [nova] flavors). A bad
# grid stops stack.sh; the parser said why on the line above.
function rapid_vmm_load_vm_types {
    local python=${RAPID_VMM_PYTHON:-$PYTHON}
    local types
    if ! types=$("$python" -m rapid_vmm.flavors "$RAPID_VMM_VM_TYPES"); then
        die $LINENO "RAPID_VMM_VM_TYPES '$RAPID_VMM_VM_TYPES' is not a" \
            "grid of VM types (see the line above), e.g." \
            "'1,2,4 x 1024,2048,4096 x 20,40'"
    fi
    # One entry per line; the parser prints only digits, "_" and spaces.
    local IFS=$'\n'
    # shellcheck disable=SC2206
    _RAPID_VMM_TYPES=($types)
    if [[ ${#_RAPID_VMM_TYPES[@]} -eq 0 ]]; then
        die $LINENO "python -m rapid_vmm.flavors printed no VM type for" \
            "'$RAPID_VMM_VM_TYPES' (is this rapid-vmm installed in $python?)"
    fi
}

# rapid_vmm_driver - print the compute driver of the agent: "nova" when
# RAPID_VMM_COMPUTE_DRIVER says so, or is auto and Nova runs here;
# "libvirt" otherwise
function rapid_vmm_driver {
    if [[ "$RAPID_VMM_COMPUTE_DRIVER" == "auto" ]]; then
        if is_service_enabled n-api n-cpu; then
            echo nova
        else
            echo libvirt
        fi
    else
        echo "$RAPID_VMM_COMPUTE_DRIVER"
    fi
}

# rapid_vmm_nova_password - print the password of the agent's Nova user
function rapid_vmm_nova_password {
    if [[ -n "$RAPID_VMM_NOVA_PASSWORD" ]]; then
        echo "$RAPID_VMM_NOVA_PASSWORD"
    elif [[ "$RAPID_VMM_NOVA_AUTH" == "service" ]]; then
        echo "$SERVICE_PASSWORD"
    else
        echo "$ADMIN_PASSWORD"
    fi
}

# rapid_vmm_flavor_map - print the value of [nova] flavors: every type of
# the grid mapped to the flavor this plugin creates for it
function rapid_vmm_flavor_map {
    local entry key
    local map=""
    for entry in "${_RAPID_VMM_TYPES[@]}"; do
        key=${entry%% *}
        map+="${map:+,}${key}:${RAPID_VMM_FLAVOR_PREFIX}${key}"
    done
    echo "$map"
}

# install_rapid_vmm_prereqs - distribution packages: the headers that
# libvirt-python builds against and qemu-img; in libvirt mode also libvirtd
# and QEMU, with the stack user in the libvirt group
function install_rapid_vmm_prereqs {
    if is_ubuntu; then
        install_package libvirt-dev pkg-config qemu-utils
    else
        install_package libvirt-devel pkgconf-pkg-config qemu-img
    fi
    if [[ "$(rapid_vmm_driver)" == "libvirt" && \
            "$RAPID_VMM_INSTALL_LIBVIRT" == "True" ]]; then
        if is_ubuntu; then
            install_package libvirt-daemon-system libvirt-clients qemu-system
        else
            install_package libvirt libvirt-client qemu-kvm
        fi
        add_user_to_group "$STACK_USER" libvirt
        restart_service libvirtd
    fi
}

# install_rapid_vmm - the rapid-vmm package from RAPID_VMM_DIR
function install_rapid_vmm {
    setup_develop "$RAPID_VMM_DIR"
}

# configure_rapid_vmm - write RAPID_VMM_CONF: a fresh sample of every
# option from oslo-config-generator, then the values of this devstack
function configure_rapid_vmm {
    local conf=$RAPID_VMM_CONF
    local driver
    driver=$(rapid_vmm_driver)
    local transport_url
    transport_url=$(get_transport_url)
    if [[ -z "$transport_url" ]]; then
        die $LINENO "rapid-vmm needs RabbitMQ: enable the rabbit service" \
            "or set RABBIT_HOST and RABBIT_PASSWORD"
    fi

    sudo install -d -o "$STACK_USER" -m 755 "$RAPID_VMM_CONF_DIR"
    oslo-config-generator \
        --config-file "$RAPID_VMM_DIR/etc/rapid-vmm/rapid-vmm-config-generator.conf" \
        --output-file "$conf"
    # it holds the RabbitMQ and Keystone passwords
    chmod 0640 "$conf"

    iniset "$conf" DEFAULT transport_url "$transport_url"
    iniset "$conf" DEFAULT host "$RAPID_VMM_HOST"
    iniset "$conf" DEFAULT my_ip "$RAPID_VMM_MY_IP"
    iniset "$conf" DEFAULT vmm_topic "$RAPID_VMM_TOPIC"
    iniset "$conf" DEFAULT ds_topic "$RAPID_VMM_DS_TOPIC"
    iniset "$conf" DEFAULT slam_topic "$RAPID_VMM_SLAM_TOPIC"
    iniset "$conf" DEFAULT compute_driver "$driver"
    iniset "$conf" DEFAULT data_path "$RAPID_VMM_DATA_DIR"
    iniset "$conf" DEFAULT report_interval "$RAPID_VMM_REPORT_INTERVAL"
    iniset "$conf" DEFAULT helper_vm_count "$RAPID_VMM_HELPER_VM_COUNT"
    iniset "$conf" DEFAULT as_register_timeout "$RAPID_VMM_AS_REGISTER_TIMEOUT"
    iniset "$conf" DEFAULT vm_types "$RAPID_VMM_VM_TYPES"
    iniset "$conf" gpu backend "$RAPID_VMM_GPU_BACKEND"
    iniset "$conf" gpu total_cores "$RAPID_VMM_GPU_TOTAL_CORES"

    # Logging like the other devstack services
    iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    setup_logging "$conf"

    if [[ "$driver" == "nova" ]]; then
        configure_rapid_vmm_nova "$conf"
    else
        configure_rapid_vmm_libvirt "$conf"
    fi
}

# configure_rapid_vmm_libvirt - the [libvirt] group of libvirt mode
function configure_rapid_vmm_libvirt {
    local conf=$1
    iniset "$conf" libvirt connection_uri "$RAPID_VMM_LIBVIRT_URI"
    iniset "$conf" libvirt virt_type "$RAPID_VMM_LIBVIRT_VIRT_TYPE"
    iniset "$conf" libvirt network "$RAPID_VMM_LIBVIRT_NETWORK"
    iniset "$conf" libvirt normal_image "$RAPID_VMM_LIBVIRT_IMAGE"
    iniset "$conf" libvirt images_path "$RAPID_VMM_LIBVIRT_IMAGES_PATH"
}

# configure_rapid_vmm_nova - the [nova] group of Nova mode: keystoneauth
# options from devstack's credentials, flavors, network, security group and
# images
function configure_rapid_vmm_nova {
    local conf=$1
    iniset "$conf" nova auth_type password
    iniset "$conf" nova auth_url "$KEYSTONE_SERVICE_URI"
    iniset "$conf" nova username "$RAPID_VMM_NOVA_USERNAME"
    iniset "$conf" nova password "$(rapid_vmm_nova_password)"
    iniset "$conf" nova project_name "$RAPID_VMM_NOVA_PROJECT_NAME"
    iniset "$conf" nova user_domain_name "$RAPID_VMM_NOVA_USER_DOMAIN_NAME"
    iniset "$conf" nova project_domain_name "$RAPID_VMM_NOVA_PROJECT_DOMAIN_NAME"
    iniset "$conf" nova region_name "$RAPID_VMM_NOVA_REGION_NAME"
    if is_service_enabled tls-proxy; then
        iniset "$conf" nova cafile "$SSL_BUNDLE_FILE"
    fi
    iniset "$conf" nova flavors "$(rapid_vmm_flavor_map)"
    iniset "$conf" nova network "$RAPID_VMM_NOVA_NETWORK"
    iniset "$conf" nova security_group "$RAPID_VMM_SECURITY_GROUP"
    iniset "$conf" nova linux_image "$RAPID_VMM_NOVA_IMAGE"
    iniset "$conf" nova linux_helper_image "$RAPID_VMM_NOVA_HELPER_IMAGE"
    if [[ -n "$RAPID_VMM_NOVA_ANDROID_IMAGE" ]]; then
        iniset "$conf" nova android_image "$RAPID_VMM_NOVA_ANDROID_IMAGE"
        iniset "$conf" nova android_helper_image "$RAPID_VMM_NOVA_ANDROID_HELPER_IMAGE"
    fi
    if [[ -n "$RAPID_VMM_NOVA_KEY_NAME" ]]; then
        iniset "$conf" nova key_name "$RAPID_VMM_NOVA_KEY_NAME"
    fi
    iniset "$conf" nova boot_timeout "$RAPID_VMM_NOVA_BOOT_TIMEOUT"
}

# init_rapid_vmm - the state directory, then what the driver needs
function init_rapid_vmm {
    sudo install -d -o "$STACK_USER" -m 755 "$RAPID_VMM_DATA_DIR"
    if [[ "$(rapid_vmm_driver)" == "nova" ]]; then
        create_rapid_vmm_nova_account
        create_rapid_vmm_flavors
        create_rapid_vmm_security_group
    else
        init_rapid_vmm_libvirt
    fi
}

# init_rapid_vmm_libvirt - the instance disk directory and the template
# image, downloaded unless RAPID_VMM_LIBVIRT_IMAGE is already a file
function init_rapid_vmm_libvirt {
    local image=$RAPID_VMM_LIBVIRT_IMAGE
    sudo install -d -o "$STACK_USER" -m 755 "$RAPID_VMM_LIBVIRT_IMAGES_PATH"
    if [[ ! -f "$image" ]]; then
        local downloaded
        downloaded=$(get_extra_file "$RAPID_VMM_LIBVIRT_IMAGE_URL")
        sudo install -d -o "$STACK_USER" -m 755 "${image%/*}"
        cp "$downloaded" "$image"
    fi
    if [[ ! -r "$image" ]]; then
        die $LINENO "rapid-vmm template image $image is not readable"
    fi
}

# create_rapid_vmm_nova_account - in "service" mode, the agent's user with
# the admin role in its project
function create_rapid_vmm_nova_account {
    if [[ "$RAPID_VMM_NOVA_AUTH" != "service" ]]; then
        return 0
    fi
    get_or_create_user "$RAPID_VMM_NOVA_USERNAME" \
        "$(rapid_vmm_nova_password)" "$RAPID_VMM_NOVA_USER_DOMAIN_NAME"
    get_or_add_user_project_role admin "$RAPID_VMM_NOVA_USERNAME" \
        "$RAPID_VMM_NOVA_PROJECT_NAME" "$RAPID_VMM_NOVA_USER_DOMAIN_NAME" \
        "$RAPID_VMM_NOVA_PROJECT_DOMAIN_NAME"
}

# create_rapid_vmm_flavors - one flavor per type of the grid; flavors that
# exist already are kept, so a second stack.sh creates nothing
function create_rapid_vmm_flavors {
    local entry vm_type vcpus memory_mb disk_gb name
    local -a fields
    for entry in "${_RAPID_VMM_TYPES[@]}"; do
        # shellcheck disable=SC2206
        fields=($entry)
        vm_type=${fields[0]}
        vcpus=${fields[1]}
        memory_mb=${fields[2]}
        disk_gb=${fields[3]}
        name=$RAPID_VMM_FLAVOR_PREFIX$vm_type
        if ! openstack --os-region-name "$RAPID_VMM_NOVA_REGION_NAME" \
                flavor show "$name" >/dev/null 2>&1; then
            openstack --os-region-name "$RAPID_VMM_NOVA_REGION_NAME" \
                flavor create --vcpus "$vcpus" --ram "$memory_mb" \
                --disk "$disk_gb" --public "$name" >/dev/null
        fi
    done
}

# create_rapid_vmm_security_group - the group of the agent's servers, in
# the agent's project, with ICMP and RAPID_VMM_SECURITY_GROUP_TCP_PORTS
# open; a group that exists already is left as it is
function create_rapid_vmm_security_group {
    local project_args=(--project "$RAPID_VMM_NOVA_PROJECT_NAME"
        --project-domain "$RAPID_VMM_NOVA_PROJECT_DOMAIN_NAME")
    local os_args=(--os-region-name "$RAPID_VMM_NOVA_REGION_NAME")
    local groups
    groups=$(openstack "${os_args[@]}" security group list \
        "${project_args[@]}" -f value -c Name)
    if [[ $'\n'"$groups"$'\n' == *$'\n'"$RAPID_VMM_SECURITY_GROUP"$'\n'* ]]; then
        return 0
    fi

    local group_id port
    group_id=$(openstack "${os_args[@]}" security group create \
        "${project_args[@]}" --description "VMs of rapid-vmm" \
        -f value -c id "$RAPID_VMM_SECURITY_GROUP")
    openstack "${os_args[@]}" security group rule create --ingress \
        --ethertype IPv4 --protocol icmp "$group_id" >/dev/null
    for port in $RAPID_VMM_SECURITY_GROUP_TCP_PORTS; do
        openstack "${os_args[@]}" security group rule create --ingress \
            --ethertype IPv4 --protocol tcp --dst-port "$port" \
            "$group_id" >/dev/null
    done
}

# start_rapid_vmm - the agent as the devstack service rapid-vmm
function start_rapid_vmm {
    run_process rapid-vmm "$RAPID_VMM_BIN_DIR/rapid-vmm --config-file $RAPID_VMM_CONF"
}

# stop_rapid_vmm - stop the agent
function stop_rapid_vmm {
    stop_process rapid-vmm
}

# cleanup_rapid_vmm - remove the libvirt domains the agent made, its state
# and its configuration
function cleanup_rapid_vmm {
    if [[ "$(rapid_vmm_driver)" == "libvirt" ]]; then
        cleanup_rapid_vmm_domains
    fi
    sudo rm -rf "$RAPID_VMM_DATA_DIR" "$RAPID_VMM_CONF_DIR"
}

# cleanup_rapid_vmm_domains - destroy and undefine the domains named like
# the agent's VMs (rapid-vm-*, rapid-helper-*); their disks are in the
# state directory, removed next
function cleanup_rapid_vmm_domains {
    if ! command -v virsh >/dev/null 2>&1; then
        return 0
    fi
    local virsh_args=(-c "$RAPID_VMM_LIBVIRT_URI")
    local domain
    for domain in $(sudo virsh "${virsh_args[@]}" list --all --name 2>/dev/null); do
        if [[ "$domain" == rapid-vm-* || "$domain" == rapid-helper-* ]]; then
            sudo virsh "${virsh_args[@]}" destroy "$domain" >/dev/null 2>&1 || true
            sudo virsh "${virsh_args[@]}" undefine --managed-save "$domain" \
                >/dev/null 2>&1 || true
        fi
    done
}


# Dispatcher
# ----------

if is_service_enabled rapid-vmm; then
    rapid_vmm_check_settings

    if [[ "$1" == "stack" && "${2:-}" == "pre-install" ]]; then
        echo_summary "Installing rapid-vmm prerequisites"
        install_rapid_vmm_prereqs

    elif [[ "$1" == "stack" && "${2:-}" == "install" ]]; then
        echo_summary "Installing rapid-vmm"
        install_rapid_vmm

    elif [[ "$1" == "stack" && "${2:-}" == "post-config" ]]; then
        echo_summary "Configuring rapid-vmm"
        rapid_vmm_load_vm_types
        configure_rapid_vmm

    elif [[ "$1" == "stack" && "${2:-}" == "extra" ]]; then
        echo_summary "Initializing and starting rapid-vmm"
        rapid_vmm_load_vm_types
        init_rapid_vmm
        start_rapid_vmm
    fi

    if [[ "$1" == "unstack" ]]; then
        stop_rapid_vmm
    fi

    if [[ "$1" == "clean" ]]; then
        cleanup_rapid_vmm
    fi
fi

# Restore xtrace
$_XTRACE_RAPID_VMM
