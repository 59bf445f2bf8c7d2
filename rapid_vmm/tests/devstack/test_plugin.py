"""The devstack plugin (devstack/), checked without a devstack.

Each test runs tools/devstack-check/run.sh (lint, static checks, or a dry run
of one scenario with fake devstack functions, then verify.py). The second
half breaks a copy of the plugin on purpose and expects the checker to fail
with the right message, so the checks cannot pass vacuously.
"""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
CHECK_DIR = os.path.join(REPO, 'tools', 'devstack-check')
RUN = os.path.join(CHECK_DIR, 'run.sh')

SCENARIOS = ('libvirt', 'nova', 'nova-service', 'disabled')


def run_check(tmp_path, *steps, repo=None):
    # run.sh keeps its work directory on failure: in pytest's tmp_path
    env = dict(os.environ, RAPID_VMM_CHECK_PYTHON=sys.executable,
               TMPDIR=str(tmp_path))
    command = ['bash', RUN]
    if repo is not None:
        command += ['--repo', str(repo)]
    return subprocess.run(command + list(steps), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240,
                          check=False)


def output(result):
    return f'--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}'


def test_lint(tmp_path):
    # without shellcheck, run.sh warns and still runs bash -n and bashate
    result = run_check(tmp_path, 'lint')
    assert result.returncode == 0, output(result)


def test_static_checks(tmp_path):
    result = run_check(tmp_path, 'static')
    assert result.returncode == 0, output(result)
    assert 'static checks' in result.stdout


@pytest.mark.parametrize('scenario', SCENARIOS)
def test_dry_run(tmp_path, scenario):
    result = run_check(tmp_path, scenario)
    assert result.returncode == 0, output(result)
    assert f'verified dry run {scenario}' in result.stdout


# The checker must fail on a broken plugin
# ----------------------------------------

@pytest.fixture
def broken_repo(tmp_path):
    """A copy of what the checker reads: devstack/, etc/, setup.cfg, and
    the package (linked: the plugin runs its parser of the grid)."""
    repo = tmp_path / 'repo'
    shutil.copytree(os.path.join(REPO, 'devstack'), repo / 'devstack')
    shutil.copytree(os.path.join(REPO, 'etc'), repo / 'etc')
    shutil.copy(os.path.join(REPO, 'setup.cfg'), repo / 'setup.cfg')
    (repo / 'rapid_vmm').symlink_to(os.path.join(REPO, 'rapid_vmm'))
    return repo


def edit(repo, name, old, new):
    path = repo / 'devstack' / name
    text = path.read_text(encoding='utf-8')
    assert old in text, f'{old!r} is no longer in devstack/{name}'
    path.write_text(text.replace(old, new, 1), encoding='utf-8')


ESCAPE = '/etc/rapid-vmm-dry-run-escape'

BROKEN = {
    # name: (step, file, old, new, expected in the output)
    'bogus_default_key': (
        'libvirt', 'plugin.sh',
        'iniset "$conf" DEFAULT host "$RAPID_VMM_HOST"',
        'iniset "$conf" DEFAULT host "$RAPID_VMM_HOST"\n'
        '    iniset "$conf" DEFAULT no_such_option 1',
        '[DEFAULT] no_such_option is not an option'),
    'bogus_nova_key': (
        'nova', 'plugin.sh',
        'iniset "$conf" nova auth_type password',
        'iniset "$conf" nova auth_typo password',
        '[nova] auth_typo is not an option'),
    'write_outside_sandbox': (
        'libvirt', 'plugin.sh',
        'sudo install -d -o "$STACK_USER" -m 755 "$RAPID_VMM_CONF_DIR"',
        f'sudo install -d -o "$STACK_USER" -m 755 {ESCAPE}',
        f'would write {ESCAPE}, outside the sandbox'),
    'bad_value': (
        'libvirt', 'plugin.sh',
        'iniset "$conf" DEFAULT report_interval '
        '"$RAPID_VMM_REPORT_INTERVAL"',
        'iniset "$conf" DEFAULT report_interval soon',
        'report_interval: the value does not parse'),
    'wrong_driver': (
        'nova', 'plugin.sh',
        '            echo nova\n', '            echo libvirt\n',
        "compute_driver is 'libvirt', expected 'nova'"),
    'works_while_disabled': (
        'disabled', 'plugin.sh',
        '\nif is_service_enabled rapid-vmm; then',
        '\ninstall_package libvirt-dev\nif is_service_enabled rapid-vmm; '
        'then',
        'rapid-vmm is disabled but the plugin called'),
    'no_stop_on_unstack': (
        'libvirt', 'plugin.sh',
        '    stop_process rapid-vmm\n', '    :\n',
        'unstack must stop_process rapid-vmm'),
    'no_start': (
        'nova', 'plugin.sh',
        '        start_rapid_vmm\n', '',
        'rapid-vmm must be started once with run_process'),
    'clean_keeps_state': (
        'libvirt', 'plugin.sh',
        'sudo rm -rf "$RAPID_VMM_DATA_DIR" "$RAPID_VMM_CONF_DIR"',
        'sudo rm -rf "$RAPID_VMM_CONF_DIR"',
        'clean left $RAPID_VMM_DATA_DIR'),
    'flavors_not_idempotent': (
        'nova', 'plugin.sh',
        'if ! openstack --os-region-name "$RAPID_VMM_NOVA_REGION_NAME" \\\n'
        '                flavor show "$name" >/dev/null 2>&1; then',
        'if true; then',
        'DRY RUN FAILED [stack2]'),
    'unknown_command': (
        'libvirt', 'plugin.sh',
        '        restart_service libvirtd\n',
        '        systemctl restart libvirtd\n',
        "the plugin ran 'systemctl restart libvirtd'"),
    'password_read_by_settings': (
        'nova', 'settings',
        'RAPID_VMM_NOVA_PASSWORD=${RAPID_VMM_NOVA_PASSWORD:-}',
        'RAPID_VMM_NOVA_PASSWORD=${RAPID_VMM_NOVA_PASSWORD:-$ADMIN_PASSWORD}',
        'ADMIN_PASSWORD: unbound variable'),
    'undefined_variable_static': (
        'static', 'plugin.sh',
        'iniset "$conf" DEFAULT host "$RAPID_VMM_HOST"',
        'iniset "$conf" DEFAULT host "$RAPID_VMM_HOSTNAME"',
        '$RAPID_VMM_HOSTNAME is read but neither assigned'),
    'redirection': (
        'static', 'plugin.sh',
        '    iniset "$conf" libvirt images_path',
        '    echo x >"$conf.extra"\n    iniset "$conf" libvirt images_path',
        'redirection to \'"$conf.extra"\''),
    'bad_grid': (
        'libvirt', 'settings',
        'RAPID_VMM_VM_TYPES=${RAPID_VMM_VM_TYPES:-"1,2,4 x 1024,2048,4096 '
        'x 20,40"}',
        'RAPID_VMM_VM_TYPES=${RAPID_VMM_VM_TYPES:-"1,2,4 x 1024"}',
        "RAPID_VMM_VM_TYPES '1,2,4 x 1024' is not a grid of VM types"),
    'grid_parsed_again': (
        'nova', 'plugin.sh',
        '"$python" -m rapid_vmm.flavors "$RAPID_VMM_VM_TYPES"',
        '"$python" -c "print(1)" "$RAPID_VMM_VM_TYPES"',
        "only 'python3 -m rapid_vmm.flavors GRID' is allowed"),
    'setting_without_default': (
        'static', 'settings',
        'RAPID_VMM_TOPIC=${RAPID_VMM_TOPIC:-rapid_vmm}',
        'RAPID_VMM_TOPIC=rapid_vmm',
        'RAPID_VMM_TOPIC must keep a value from local.conf'),
}


@pytest.mark.parametrize('case', sorted(BROKEN))
def test_broken_plugin_fails(tmp_path, broken_repo, case):
    step, name, old, new, expected = BROKEN[case]
    edit(broken_repo, name, old, new)
    result = run_check(tmp_path, step, repo=broken_repo)
    assert result.returncode != 0, output(result)
    assert f'devstack-check: FAIL ({step})' in result.stderr, output(result)
    assert expected in result.stdout + result.stderr, output(result)
    assert not os.path.exists(ESCAPE)


def test_empty_plugin_fails(tmp_path, broken_repo):
    (broken_repo / 'devstack' / 'plugin.sh').write_text(
        '# a plugin that does nothing\n', encoding='utf-8')
    result = run_check(tmp_path, 'libvirt', repo=broken_repo)
    assert result.returncode != 0, output(result)
    assert 'did not install libvirt-dev' in result.stderr, output(result)


# The fake iniset behaves like devstack's
# ---------------------------------------

def fake_shell(tmp_path, script):
    sandbox = tmp_path / 'sandbox'
    sandbox.mkdir(exist_ok=True)
    env = dict(os.environ,
               FD_SANDBOX=str(sandbox.resolve()),
               FD_LOG=str(tmp_path / 'calls.log'),
               FD_FAILED=str(tmp_path / 'FAILED'),
               FD_STATE=str(tmp_path / 'state'),
               FD_REAL_PATH=os.environ['PATH'],
               FD_BIN_DIR=os.path.dirname(sys.executable),
               FD_PROCESS='test')
    fake = os.path.join(CHECK_DIR, 'fake-devstack.sh')
    return subprocess.run(
        ['bash', '-c', f'set -eu; source "{fake}"; {script}'],
        env=env, capture_output=True, text=True, check=False, timeout=60)


def test_fake_iniset_like_devstack(tmp_path):
    conf = tmp_path / 'sandbox' / 'a.conf'
    script = f'''
        iniset {conf} DEFAULT debug True
        iniset {conf} nova username admin
        iniset {conf} DEFAULT host one
        iniset {conf} DEFAULT host two
        iniset {conf} nova flavors "1_1024_20:a|b&c\\\\d,2_2048_40:e/f"
        iniset {conf} libvirt network default
        inicomment {conf} libvirt network
        iniset {conf} gpu backend auto
        iniget {conf} nova flavors
    '''
    (tmp_path / 'sandbox').mkdir()
    conf.write_text('[DEFAULT]\n#host = example\n\n[nova]\n#username =\n'
                    '[libvirt]\n', encoding='utf-8')
    result = fake_shell(tmp_path, script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '1_1024_20:a|b&c\\d,2_2048_40:e/f\n'
    assert conf.read_text(encoding='utf-8') == (
        '[DEFAULT]\n'
        'host = two\n'
        'debug = True\n'
        '#host = example\n'
        '\n'
        '[nova]\n'
        'flavors = 1_1024_20:a|b&c\\d,2_2048_40:e/f\n'
        'username = admin\n'
        '#username =\n'
        '[libvirt]\n'
        '#network = default\n'
        '\n'
        '[gpu]\n'
        'backend = auto\n')


def test_fake_commands_refuse_paths_outside_the_sandbox(tmp_path):
    outside = tmp_path / 'outside'
    for command in (f'mkdir -p {outside}',
                    f'sudo install -d -o stack {outside}',
                    f'iniset {outside}/x.conf DEFAULT a b',
                    f'touch {tmp_path}/sandbox/../outside',
                    f'cp /etc/hostname {outside}'):
        result = fake_shell(tmp_path, command)
        assert result.returncode != 0, command
        assert 'outside the sandbox' in result.stderr, command
        assert not outside.exists(), command
