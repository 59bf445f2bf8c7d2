"""Check what a dry run of the rapid-vmm devstack plugin did.

Usage: verify.py <workdir>   (the directory dry-run.sh filled)

Reads the calls the plugin made (calls.log), the variables at the end of
each process (env/) and the configuration file after each stack.sh
(artifacts/), and checks them against the options rapid-vmm registers.
Stops at the first failed check with one line saying what is wrong; exit
status 1.
"""

import collections
import dataclasses
from importlib import metadata
import os
import shlex
import subprocess
import sys

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

# rapid_vmm makes oslo.service's threading backend the default before
# oslo.service is imported (by oslo.messaging, or the generator namespaces):
# oslo_messaging is imported below, after it
from rapid_vmm import conf as rapid_conf
from rapid_vmm import flavors
from rapid_vmm.virt import driver as virt_driver

GENERATOR = os.path.join('etc', 'rapid-vmm',
                         'rapid-vmm-config-generator.conf')

# Calls the plugin may make while disabled: the check itself, and what
# devstack/settings does whatever the services are
DISABLED_ALLOWED = {'is_service_enabled', 'define_plugin', 'enable_service',
                    'get_python_exec_prefix', 'trueorfalse'}


class CheckFailed(Exception):
    """One check failed; the message says which and why."""


def ensure(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclasses.dataclass
class Call:
    process: str
    phase: str
    kind: str
    name: str
    args: list[str]

    def __str__(self) -> str:
        return (f'[{self.process} {self.phase}] {self.name} '
                f'{shlex.join(self.args)}')


def load_calls(path: str) -> list[Call]:
    with open(path, encoding='utf-8', errors='replace') as handle:
        text = handle.read()
    calls = []
    for record in text.split('\x1e\n'):
        if not record:
            continue
        fields = record.split('\x1f')
        calls.append(Call(fields[0], fields[1], fields[2], fields[3],
                          fields[4:]))
    return calls


def load_env(path: str) -> dict[str, str]:
    with open(path, encoding='utf-8', errors='replace') as handle:
        text = handle.read()
    env = {}
    for record in text.split('\x1e\n'):
        if record:
            name, _, value = record.partition('\x1f')
            env[name] = value
    return env


# Options
# -------

def generator_namespaces(repo: str) -> list[str]:
    namespaces = []
    with open(os.path.join(repo, GENERATOR), encoding='utf-8') as handle:
        for line in handle:
            key, _, value = line.partition('=')
            if key.strip() == 'namespace':
                namespaces.append(value.strip())
    ensure(namespaces, f'{GENERATOR} lists no namespace')
    return namespaces


def _group_name(group: object) -> str:
    if group is None:
        return 'DEFAULT'
    return group if isinstance(group, str) else group.name


def build_conf(repo: str) -> tuple[cfg.ConfigOpts, dict]:
    """The agent's options plus those of the generator's namespaces.

    Returns the ConfigOpts and ``{group: {key: Opt}}`` of every option a
    configuration file may set (keystoneauth's password plugin included in
    [nova]).
    """
    conf = cfg.ConfigOpts()
    rapid_conf.register_opts(conf)
    registry: dict[str, dict[str, cfg.Opt]] = collections.defaultdict(dict)
    # keystoneauth's plugin options are registered by the agent when it
    # loads the plugin named by [nova] auth_type, not up front
    plugin_options = {opt.dest for opt in
                      ks_loading.get_auth_plugin_conf_options('password')}
    runtime_nova = set(conf.nova)

    def add(group: object, opts: list) -> None:
        name = _group_name(group)
        for opt in opts:
            registry[name][opt.dest] = opt
            if name == 'nova' and opt.dest in plugin_options - runtime_nova:
                continue
            try:
                conf.register_opt(
                    opt, group=None if name == 'DEFAULT' else group)
            except cfg.DuplicateOptError:
                pass  # the same option from two lists: the first one wins

    entry_points = metadata.entry_points(group='oslo.config.opts')
    for namespace in generator_namespaces(repo):
        found = [ep for ep in entry_points if ep.name == namespace]
        ensure(found, f'no oslo.config.opts entry point {namespace!r} '
                      f'(listed in {GENERATOR}) in this Python environment')
        for ep in found:
            for group, opts in ep.load()():
                add(group, list(opts))
    add('nova', ks_loading.get_auth_plugin_conf_options('password'))
    return conf, registry


def config_keys(path: str) -> list[tuple[str, str, int]]:
    """(section, key, line) of every uncommented option of an INI file."""
    keys = []
    section = None
    with open(path, encoding='utf-8') as handle:
        for number, line in enumerate(handle, 1):
            stripped = line.rstrip('\n')
            if not stripped.strip() or stripped.lstrip()[0] in '#;':
                continue
            if stripped.startswith('['):
                section = stripped.strip()[1:-1]
                continue
            if stripped[0] in ' \t':
                continue  # continuation line
            key = stripped.split('=', 1)[0].strip()
            ensure(section is not None,
                   f'{path}:{number}: option {key!r} before any section')
            keys.append((section, key, number))
    return keys


def check_known(registry: dict, section: str, key: str, where: str) -> None:
    options = registry.get(section)
    ensure(options is not None,
           f'{where}: section [{section}] is not an option group of '
           'rapid-vmm or of the libraries in its config generator')
    ensure(key in options,
           f'{where}: [{section}] {key} is not an option rapid-vmm '
           'registers (nor oslo.log/oslo.messaging/keystoneauth)')
    ensure(not options[key].deprecated_for_removal,
           f'{where}: [{section}] {key} is deprecated for removal')


def read_every_option(conf: cfg.ConfigOpts, registry: dict,
                      path: str) -> None:
    """Read each option once, as rapid_vmm.config_check does at start."""
    for section, options in registry.items():
        group = conf if section == 'DEFAULT' else conf[section]
        for key in options:
            try:
                getattr(group, key)
            except cfg.NoSuchOptError:
                continue  # a keystoneauth option loaded with the plugin
            except (cfg.Error, ValueError) as exc:
                raise CheckFailed(f'{path}: [{section}] {key}: the value '
                                  f'does not parse: {exc}') from None


def parse_config(repo: str, path: str) -> tuple[cfg.ConfigOpts, dict]:
    conf, registry = build_conf(repo)
    for section, key, number in config_keys(path):
        check_known(registry, section, key, f'{path}:{number}')
    try:
        conf(args=['--config-file', path], project='rapid-vmm',
             default_config_files=[], default_config_dirs=[], use_env=False)
    except cfg.Error as exc:
        raise CheckFailed(f'{path} does not load: {exc}') from None
    read_every_option(conf, registry, path)
    return conf, registry


def run_validator(repo: str, path: str) -> None:
    """oslo-config-validator: every option of the file is in the sample."""
    result = subprocess.run(  # noqa: S603 - a fixed command line
        [sys.executable, '-m', 'oslo_config.validator',
         '--config-file', os.path.join(repo, GENERATOR),
         '--input-file', path, '--fatal-warnings'],
        capture_output=True, text=True, check=False, cwd=repo)
    errors = [line for line in result.stderr.splitlines()
              if line.startswith(('ERROR', 'WARNING'))]
    ensure(result.returncode == 0,
           f'oslo-config-validator rejects {path}: '
           + ('; '.join(errors) or result.stderr.strip()[-500:]))


# The checks
# ----------

class Verifier:
    def __init__(self, work: str):
        self.work = work
        self.calls = load_calls(os.path.join(work, 'calls.log'))
        self.envs = {name: load_env(os.path.join(work, 'env', name))
                     for name in sorted(os.listdir(os.path.join(work, 'env')))}
        ensure('stack1' in self.envs,
               f'{work}: the dry run did not finish its first stack.sh')
        self.env = self.envs['stack1']
        self.scenario = self.env['FD_SCENARIO']
        self.expect = self.env['FD_EXPECT_DRIVER']
        self.repo = self.env['FD_REPO']
        self.sandbox = self.env['FD_SANDBOX']

    def calls_of(self, name: str, process: str | None = None,
                 phase: str | None = None) -> list[Call]:
        return [call for call in self.calls
                if call.name == name and
                (process is None or call.process == process) and
                (phase is None or call.phase == phase)]

    def run(self) -> None:
        refusals = [call for call in self.calls if call.kind == 'f']
        ensure(not refusals, f'the harness refused: {refusals[:1]}')
        if self.expect == 'none':
            self.check_disabled()
        else:
            self.check_enabled()

    def check_disabled(self) -> None:
        for call in self.calls:
            ensure(call.name in DISABLED_ALLOWED,
                   f'rapid-vmm is disabled but the plugin called {call}')
        ensure(all(call.args == ['rapid-vmm']
                   for call in self.calls_of('is_service_enabled')
                   if call.phase != 'source'),
               'disabled: the plugin asked about other services than '
               'rapid-vmm')
        ensure(',rapid-vmm,' not in f",{self.env['ENABLED_SERVICES']},",
               'disabled: devstack/settings enabled rapid-vmm although '
               'local.conf disabled it')
        ensure(not os.listdir(os.path.join(self.work, 'artifacts')),
               'disabled: a configuration file was written')
        ensure(not os.path.exists(self.env['RAPID_VMM_CONF_DIR']),
               'disabled: the configuration directory was made')
        ensure(not os.path.exists(self.env['RAPID_VMM_DATA_DIR']),
               'disabled: the state directory was made')

    def check_enabled(self) -> None:
        env = self.env
        conf_path = env['RAPID_VMM_CONF']
        stacks = [p for p in self.envs if p.startswith('stack')]
        ensure(len(stacks) == 2, f'expected two stack.sh runs, got {stacks}')

        # install
        for process in stacks:
            packages = [pkg for call in self.calls_of(
                'install_package', process, 'stack:pre-install')
                for pkg in call.args]
            for package in ('libvirt-dev', 'pkg-config', 'qemu-utils'):
                ensure(package in packages,
                       f'{process}: pre-install did not install {package} '
                       f'(installed: {packages})')
            develop = self.calls_of('setup_develop', process, 'stack:install')
            ensure([call.args for call in develop] ==
                   [[env['RAPID_VMM_DIR']]],
                   f'{process}: install must setup_develop '
                   f'{env["RAPID_VMM_DIR"]} once, did {develop}')

        # configuration: generated, then iniset
        generator = os.path.join(env['RAPID_VMM_DIR'], GENERATOR)
        for process in stacks:
            runs = self.calls_of('oslo-config-generator', process,
                                 'stack:post-config')
            ensure(len(runs) == 1, f'{process}: post-config must run '
                                   f'oslo-config-generator once: {runs}')
            args = runs[0].args
            ensure(_option(args, '--config-file') == generator,
                   f'{process}: oslo-config-generator must use {generator}')
            ensure(_option(args, '--output-file') == conf_path,
                   f'{process}: oslo-config-generator must write {conf_path}')

        _, registry = build_conf(self.repo)
        written = self.calls_of('iniset')
        ensure(written, 'the plugin wrote no option')
        for call in written:
            ensure(call.phase == 'stack:post-config',
                   f'options are written in post-config only: {call}')
            ensure(call.args[0] == conf_path,
                   f'iniset of a file other than {conf_path}: {call}')
            check_known(registry, call.args[1], call.args[2], str(call))

        artifacts = sorted(os.listdir(os.path.join(self.work, 'artifacts')))
        ensure(artifacts == [f'rapid-vmm.conf.{p}' for p in stacks],
               f'no configuration file after each stack.sh: {artifacts}')
        with open(os.path.join(self.work, 'artifacts', artifacts[0]),
                  encoding='utf-8') as first, \
                open(os.path.join(self.work, 'artifacts', artifacts[1]),
                     encoding='utf-8') as second:
            ensure(first.read() == second.read(),
                   'a second stack.sh wrote a different configuration')
        path = os.path.join(self.work, 'artifacts', artifacts[0])
        conf, registry = parse_config(self.repo, path)
        run_validator(self.repo, path)
        self.check_values(conf, path)
        self.check_start_stop(conf_path, stacks)
        if self.expect == 'nova':
            self.check_nova(conf, path)
        else:
            self.check_libvirt(conf, path)
        self.check_clean()

    def check_values(self, conf: cfg.ConfigOpts, path: str) -> None:
        import oslo_messaging  # after rapid_vmm: see the imports above

        env = self.env
        ensure(conf.compute_driver == self.expect,
               f'{path}: compute_driver is {conf.compute_driver!r}, '
               f'expected {self.expect!r} in scenario {self.scenario}')
        ensure(virt_driver.driver_name(conf) == self.expect,
               f'{path}: the agent would pick the '
               f'{virt_driver.driver_name(conf)} driver')
        expected_url = (f"rabbit://{env['RABBIT_USERID']}:"
                        f"{env['RABBIT_PASSWORD']}@{env['RABBIT_HOST']}:5672/")
        ensure(conf.transport_url == expected_url,
               f'{path}: transport_url {conf.transport_url!r} is not '
               f'devstack\'s RabbitMQ {expected_url!r}')
        url = oslo_messaging.TransportURL.parse(conf, conf.transport_url)
        ensure(url.transport == 'rabbit' and
               url.hosts[0].hostname == env['RABBIT_HOST'],
               f'{path}: transport_url does not parse as rabbit on '
               f"{env['RABBIT_HOST']}")
        for option, variable in (('host', 'RAPID_VMM_HOST'),
                                 ('my_ip', 'HOST_IP'),
                                 ('vmm_topic', 'RAPID_VMM_TOPIC'),
                                 ('ds_topic', 'RAPID_VMM_DS_TOPIC'),
                                 ('slam_topic', 'RAPID_VMM_SLAM_TOPIC'),
                                 ('data_path', 'RAPID_VMM_DATA_DIR')):
            ensure(str(getattr(conf, option)) == env[variable] != '',
                   f'{path}: {option} is {getattr(conf, option)!r}, '
                   f'expected ${variable} ({env[variable]!r})')
        ensure(conf.debug is True, f'{path}: debug is not set like other '
                                   'devstack services')
        ensure(conf.report_interval == int(env['RAPID_VMM_REPORT_INTERVAL']),
               f'{path}: report_interval differs from the settings')
        ensure(conf.helper_vm_count == int(env['RAPID_VMM_HELPER_VM_COUNT']),
               f'{path}: helper_vm_count differs from the settings')
        try:
            grid = flavors.parse_grid(conf.vm_types)
        except Exception as exc:  # noqa: BLE001 - any error is a failure
            raise CheckFailed(f'{path}: vm_types: {exc}') from None
        ensure(len(grid.types) == 18,
               f'{path}: the default grid has 18 types, got '
               f'{len(grid.types)}')

    def check_start_stop(self, conf_path: str, stacks: list[str]) -> None:
        for process in stacks:
            started = self.calls_of('run_process', process)
            ensure(len(started) == 1 and
                   started[0].phase == 'stack:extra',
                   f'{process}: rapid-vmm must be started once with '
                   f'run_process in extra, got {started}')
            service, command = started[0].args[:2]
            ensure(service == 'rapid-vmm',
                   f'run_process of {service!r}, not rapid-vmm')
            argv = shlex.split(command)
            ensure(os.path.basename(argv[0]) == 'rapid-vmm' and
                   os.access(argv[0], os.X_OK),
                   f'run_process command {argv[0]!r} is not the rapid-vmm '
                   'program of the Python environment')
            ensure(argv[1:] == ['--config-file', conf_path],
                   f'run_process command {command!r} does not read '
                   f'{conf_path}')
        for process in [p for p in self.envs if p.startswith('unstack')]:
            stopped = self.calls_of('stop_process', process)
            ensure([call.args for call in stopped] == [['rapid-vmm']],
                   f'{process}: unstack must stop_process rapid-vmm, '
                   f'got {stopped}')
        ensure(not self.calls_of('run_process', 'clean') and
               not any(call.phase.startswith('unstack')
                       for call in self.calls_of('run_process')),
               'rapid-vmm started outside stack.sh')

    def check_libvirt(self, conf: cfg.ConfigOpts, path: str) -> None:
        env = self.env
        ensure(conf.libvirt.connection_uri == 'qemu:///system',
               f'{path}: [libvirt] connection_uri is '
               f'{conf.libvirt.connection_uri!r}')
        image = conf.libvirt.normal_image
        ensure(image and os.path.isabs(image),
               f'{path}: [libvirt] normal_image must be an absolute path')
        ensure(image == env['RAPID_VMM_LIBVIRT_IMAGE'],
               f'{path}: normal_image is not $RAPID_VMM_LIBVIRT_IMAGE')
        ensure(conf.libvirt.images_path and
               os.path.isabs(conf.libvirt.images_path),
               f'{path}: [libvirt] images_path must be an absolute path')
        copies = [call for call in self.calls_of('cp', 'stack1')
                  if call.args[-1] == image]
        ensure(self.calls_of('get_extra_file', 'stack1') and copies,
               'stack1: the template image was not downloaded and copied '
               f'to {image}')
        ensure(not self.calls_of('get_extra_file', 'stack2'),
               'stack2: the template image was downloaded again')
        nova_keys = [key for section, key, _ in config_keys(path)
                     if section == 'nova']
        ensure(not nova_keys, f'{path}: [nova] set in libvirt mode: '
                              f'{nova_keys}')
        # clean: the agent's domains, and only them
        touched = {call.args[-1] for call in self.calls_of('virsh', 'clean')
                   if 'destroy' in call.args or 'undefine' in call.args}
        ours = {name for name in env.get('FD_FAKE_DOMAINS', '').split()
                if name.startswith(('rapid-vm-', 'rapid-helper-'))}
        ensure(touched == ours,
               f'clean must remove the domains {sorted(ours)}, '
               f'removed {sorted(touched)}')

    def check_nova(self, conf: cfg.ConfigOpts, path: str) -> None:
        env = self.env
        service_user = env['RAPID_VMM_NOVA_AUTH'] == 'service'
        nova = conf.nova
        ensure(nova.auth_type == 'password',
               f'{path}: [nova] auth_type is {nova.auth_type!r}')
        try:
            auth = ks_loading.load_auth_from_conf_options(conf, 'nova')
            ks_loading.load_session_from_conf_options(conf, 'nova',
                                                      auth=auth)
        except Exception as exc:  # noqa: BLE001 - any error is a failure
            raise CheckFailed(f'{path}: keystoneauth cannot load [nova]: '
                              f'{exc}') from None
        ensure(auth.auth_url == env['KEYSTONE_SERVICE_URI'],
               f'{path}: [nova] auth_url is not $KEYSTONE_SERVICE_URI')
        if service_user:
            expected = ('rapid-vmm', env['SERVICE_PASSWORD'],
                        env['SERVICE_PROJECT_NAME'],
                        env['SERVICE_DOMAIN_NAME'])
        else:
            expected = ('admin', env['ADMIN_PASSWORD'], 'admin', 'Default')
        actual = (nova.username, nova.password, nova.project_name,
                  nova.user_domain_name)
        ensure(actual == expected and nova.password and
               nova.project_domain_name == expected[3],
               f'{path}: [nova] credentials {actual[:1] + actual[2:]} are '
               f'not devstack\'s {expected[:1] + expected[2:]} (or the '
               'password is wrong or empty)')
        ensure(nova.region_name == env['REGION_NAME'],
               f'{path}: [nova] region_name is not $REGION_NAME')
        tls = ',tls-proxy,' in f",{env['ENABLED_SERVICES']},"
        ensure((nova.cafile == env['SSL_BUNDLE_FILE']) if tls
               else nova.cafile is None,
               f'{path}: [nova] cafile {nova.cafile!r} (tls-proxy '
               f'{"on" if tls else "off"})')

        grid = flavors.parse_grid(conf.vm_types)
        keys = {vm_type.key for vm_type in grid.types}
        ensure(set(nova.flavors) == keys,
               f'{path}: [nova] flavors must map the {len(keys)} types of '
               f'the grid, maps {sorted(nova.flavors)}')
        created = {}
        for call in self.calls_of('openstack', 'stack1', 'stack:extra'):
            if 'flavor' in call.args and 'create' in call.args:
                args = call.args
                created[args[-1]] = (int(_option(args, '--vcpus')),
                                     int(_option(args, '--ram')),
                                     int(_option(args, '--disk')))
        for vm_type in grid.types:
            flavor = nova.flavors[vm_type.key]
            ensure(created.get(flavor) ==
                   (vm_type.vcpus, vm_type.memory_mb, vm_type.disk_gb),
                   f'flavor {flavor} of type {vm_type.key} was not created '
                   f'with that size (created: {created.get(flavor)})')
        ensure(len(created) == len(keys),
               f'extra created {len(created)} flavors for {len(keys)} types')

        group = nova.security_group
        ensure(group == env['RAPID_VMM_SECURITY_GROUP'],
               f'{path}: [nova] security_group is not '
               '$RAPID_VMM_SECURITY_GROUP')
        groups = [call for call in self.calls_of('openstack', 'stack1')
                  if call.args[-1] == group and 'create' in call.args]
        ensure(len(groups) == 1,
               f'stack1: the security group {group} must be created once')
        ensure(_option(groups[0].args, '--project') ==
               nova.project_name,
               'the security group must be made in the agent\'s project')
        rules = [call for call in self.calls_of('openstack', 'stack1')
                 if 'rule' in call.args]
        ports = {_option(call.args, '--dst-port') for call in rules}
        protocols = {_option(call.args, '--protocol') for call in rules}
        wanted = set(env['RAPID_VMM_SECURITY_GROUP_TCP_PORTS'].split())
        ensure('icmp' in protocols and wanted <= ports,
               f'security group rules: protocols {protocols}, ports '
               f'{ports}; want icmp and tcp {sorted(wanted)}')
        second = [call for call in self.calls_of('openstack', 'stack2')
                  if 'create' in call.args]
        ensure(not second, 'a second stack.sh must create nothing (the '
                           f'flavors and group exist): {second[:2]}')

        ensure(nova.network == env['PRIVATE_NETWORK_NAME'],
               f'{path}: [nova] network is not devstack\'s private network')
        ensure(nova.linux_image == env['DEFAULT_IMAGE_NAME'] ==
               nova.linux_helper_image,
               f'{path}: [nova] linux_image/linux_helper_image are not '
               'devstack\'s image')
        libvirt_keys = [key for section, key, _ in config_keys(path)
                        if section == 'libvirt']
        ensure(not libvirt_keys, f'{path}: [libvirt] set in Nova mode: '
                                 f'{libvirt_keys}')
        accounts = self.calls_of('get_or_create_user', 'stack1')
        if service_user:
            ensure(accounts and accounts[0].args[:2] ==
                   ['rapid-vmm', env['SERVICE_PASSWORD']],
                   'service mode: the rapid-vmm user was not created with '
                   'the service password')
            roles = self.calls_of('get_or_add_user_project_role', 'stack1')
            ensure(roles and roles[0].args[:3] ==
                   ['admin', 'rapid-vmm', env['SERVICE_PROJECT_NAME']],
                   'service mode: the rapid-vmm user has no admin role in '
                   'the service project')
        else:
            ensure(not accounts, 'admin mode: no user should be created')

    def check_clean(self) -> None:
        env = self.envs['clean']
        for variable in ('RAPID_VMM_CONF_DIR', 'RAPID_VMM_DATA_DIR'):
            ensure(not os.path.exists(env[variable]),
                   f'clean left ${variable} ({env[variable]})')
        ensure(self.calls_of('rm', 'clean') or self.calls_of('sudo', 'clean'),
               'clean removed nothing')


def _option(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + '='):
            return arg.split('=', 1)[1]
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print('usage: verify.py <workdir>', file=sys.stderr)
        return 2
    try:
        verifier = Verifier(argv[1])
        verifier.run()
    except CheckFailed as exc:
        print(f'FAIL: {exc}', file=sys.stderr)
        return 1
    print(f'verified dry run {verifier.scenario}: '
          f'{len(verifier.calls)} calls')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
