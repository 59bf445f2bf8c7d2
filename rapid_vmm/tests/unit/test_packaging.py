"""The files a standalone host installs: systemd unit, users, directories,
log rotation (``etc/systemd``, ``etc/sysusers.d``, ``etc/tmpfiles.d``,
``etc/logrotate.d``).

Each file is checked by the tool that reads it on a host, offline, on a
scratch root directory: ``systemd-analyze verify`` and ``security`` for the
unit, ``systemd-sysusers`` and ``systemd-tmpfiles --create`` for the user and
the directories, and a forced ``logrotate`` run on log files that a writer
keeps open. Nothing of this machine is changed.
"""

import configparser
import grp
import os
import pwd
import shutil
import stat
import subprocess

import pytest

from rapid_vmm import conf as rapid_conf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
ETC = os.path.join(REPO, 'etc')
UNIT = os.path.join(ETC, 'systemd', 'rapid-vmm.service')
SYSUSERS = os.path.join(ETC, 'sysusers.d', 'rapid-vmm.conf')
TMPFILES = os.path.join(ETC, 'tmpfiles.d', 'rapid-vmm.conf')
LOGROTATE = os.path.join(ETC, 'logrotate.d', 'rapid-vmm')
SYSTEM_UNITS = ('/usr/lib/systemd/system', '/lib/systemd/system')

#: systemd-analyze's exposure score times ten; 2.5 and lower is "OK".
EXPOSURE_THRESHOLD = 25


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f'{name} is missing: tools/setup-env.sh installs it '
                    '(apt packages systemd and logrotate)')
    return path


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True,
                          timeout=120, check=False)


def read_unit(path: str = UNIT) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       delimiters=('=',))
    parser.optionxform = str
    parser.read(path, encoding='utf-8')
    return parser


def unit_root(tmp_path, text: str) -> tuple[str, str]:
    """A scratch root holding systemd's own units, ``text`` as
    /etc/systemd/system/rapid-vmm.service and a stub for each program the
    unit runs (verify checks that they are executable)."""
    root = tmp_path / 'root'
    source = next((p for p in SYSTEM_UNITS if os.path.isdir(p)), None)
    if source is None:
        pytest.fail('systemd is not installed (no /usr/lib/systemd/system)')
    shutil.copytree(source, root / 'usr/lib/systemd/system', symlinks=True)
    unit_dir = root / 'etc/systemd/system'
    unit_dir.mkdir(parents=True)
    (unit_dir / 'rapid-vmm.service').write_text(text, encoding='utf-8')
    for line in text.splitlines():
        key, _, value = line.partition('=')
        if key.startswith('Exec') and value:
            program = value.lstrip('-@:+!').split()[0]
            stub = root / program.lstrip('/')
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text('#!/bin/sh\n')
            stub.chmod(0o755)
    return str(root), '/etc/systemd/system/rapid-vmm.service'


def verify(tmp_path, text: str) -> str:
    """``systemd-analyze verify`` of ``text``: '' when clean, else what it
    says (it only warns about a setting it cannot parse, exit status 0)."""
    root, unit = unit_root(tmp_path, text)
    result = run(tool('systemd-analyze'), 'verify', f'--root={root}', unit)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not output:
        output = f'exit status {result.returncode}'
    return output


def unit_text() -> str:
    with open(UNIT, encoding='utf-8') as unit:
        return unit.read()


# -- the systemd unit -------------------------------------------------------


def test_unit_verifies_clean(tmp_path):
    assert verify(tmp_path, unit_text()) == ''


@pytest.mark.parametrize('bad, good', [
    ('Type=notify', 'Type=notifyy'),
    ('ProtectSystem=strict', 'ProtectSystem=stric'),
    ('Restart=on-failure', 'Restart=on-fail'),
])
def test_verify_reports_a_broken_unit(tmp_path, bad, good):
    # The check above can fail: a mistyped value is reported.
    assert bad in unit_text()
    assert verify(tmp_path, unit_text().replace(bad, good)) != ''


def test_unit_sandbox_exposure_is_ok(tmp_path):
    root, unit = unit_root(tmp_path, unit_text())
    result = run(tool('systemd-analyze'), 'security', '--offline=yes',
                 f'--threshold={EXPOSURE_THRESHOLD}', f'--root={root}', unit)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_unit_runs_the_agent_as_expected():
    unit = read_unit()
    service = unit['Service']
    assert service['Type'] == 'notify'
    assert service['NotifyAccess'] == 'main'
    assert service['Restart'] == 'on-failure'
    # A bad configuration exits 2: never a restart loop.
    assert service['RestartPreventExitStatus'] == '2'
    assert int(unit['Unit']['StartLimitBurst']) >= 1
    assert int(unit['Unit']['StartLimitIntervalSec']) > 0
    assert service['User'] not in ('', 'root', '0')
    assert 'libvirt' in service['SupplementaryGroups'].split()
    assert int(service['LimitNOFILE']) >= 4096
    assert '--config-file /etc/rapid-vmm/rapid-vmm.conf' in \
        service['ExecStart']
    assert service['NoNewPrivileges'] == 'yes'
    assert service['PrivateTmp'] == 'yes'
    assert service['ProtectSystem'] == 'strict'


def test_unit_keeps_libvirt_gpus_and_state_reachable():
    service = read_unit()['Service']
    writable = service['ReadWritePaths'].split()
    data_path = rapid_conf.CONF.data_path
    assert data_path in writable
    # libvirt's socket and the GPUs' device nodes stay reachable.
    for key in ('PrivateDevices', 'PrivateNetwork', 'InaccessiblePaths',
                'DevicePolicy', 'MemoryDenyWriteExecute', 'PrivateUsers'):
        assert key not in service, key
    assert 'AF_UNIX' in service['RestrictAddressFamilies'].split()
    assert 'AF_INET' in service['RestrictAddressFamilies'].split()


# -- user and directories ---------------------------------------------------


def test_sysusers_and_tmpfiles_make_the_user_and_directories(tmp_path):
    if os.geteuid() != 0:
        pytest.skip('systemd-tmpfiles needs root to chown in a scratch root')
    root = tmp_path / 'root'
    (root / 'etc/sysusers.d').mkdir(parents=True)
    (root / 'etc/tmpfiles.d').mkdir(parents=True)
    shutil.copy(SYSUSERS, root / 'etc/sysusers.d/rapid-vmm.conf')
    shutil.copy(TMPFILES, root / 'etc/tmpfiles.d/rapid-vmm.conf')

    result = run(tool('systemd-sysusers'), f'--root={root}', 'rapid-vmm.conf')
    assert result.returncode == 0, result.stderr
    passwd = (root / 'etc/passwd').read_text().splitlines()
    [entry] = [line.split(':') for line in passwd
               if line.startswith('rapid-vmm:')]
    uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    assert uid != 0
    assert home == rapid_conf.CONF.data_path
    groups = dict(line.split(':', 1) for line in
                  (root / 'etc/group').read_text().splitlines())
    assert 'rapid-vmm' in groups['libvirt'].split(':')[-1].split(',')

    result = run(tool('systemd-tmpfiles'), f'--root={root}', '--create',
                 'rapid-vmm.conf')
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    expected = {rapid_conf.CONF.data_path: 0o711,
                os.path.join(rapid_conf.CONF.data_path, 'instances'): 0o711,
                '/var/log/rapid-vmm': 0o750}
    for path, mode in expected.items():
        info = os.stat(root / path.lstrip('/'))
        assert stat.S_ISDIR(info.st_mode), path
        assert stat.S_IMODE(info.st_mode) == mode, path
        assert (info.st_uid, info.st_gid) == (uid, gid), path


def test_unit_writable_paths_are_the_tmpfiles_directories():
    with open(TMPFILES, encoding='utf-8') as tmpfiles:
        made = {line.split()[1] for line in tmpfiles
                if line.strip() and not line.startswith('#')}
    for path in read_unit()['Service']['ReadWritePaths'].split():
        assert path.lstrip('-') in made, path


# -- log rotation -------------------------------------------------------------


def rotation_config(tmp_path) -> tuple[str, str, str]:
    """The shipped logrotate file with its paths moved under ``tmp_path``
    and its ``su`` user replaced by the current one (logrotate refuses an
    unknown user)."""
    log_dir = tmp_path / 'log'
    instances = tmp_path / 'instances'
    for directory in (log_dir, instances):
        directory.mkdir()
        directory.chmod(0o711)
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    with open(LOGROTATE, encoding='utf-8') as shipped:
        text = shipped.read()
    assert 'su rapid-vmm rapid-vmm' in text
    assert '/var/lib/rapid-vmm/instances/*.console.log' in text
    text = (text.replace('/var/log/rapid-vmm/', f'{log_dir}/')
            .replace('/var/lib/rapid-vmm/instances/', f'{instances}/')
            .replace('su rapid-vmm rapid-vmm', f'su {user} {group}'))
    config = tmp_path / 'logrotate.conf'
    config.write_text(text, encoding='utf-8')
    return str(config), str(log_dir), str(instances)


def test_logrotate_parses_the_file(tmp_path):
    config, _, _ = rotation_config(tmp_path)
    result = run(tool('logrotate'), '-d', '-s', str(tmp_path / 'state'),
                 config)
    assert result.returncode == 0, result.stderr
    assert 'error' not in result.stderr.lower(), result.stderr


def test_logrotate_rotates_open_logs_in_place(tmp_path):
    config, log_dir, instances = rotation_config(tmp_path)
    agent_log = os.path.join(log_dir, 'rapid-vmm.log')
    console = os.path.join(instances, 'rapid-vm-7-abc.console.log')
    victim = tmp_path / 'not-a-log'
    victim.write_text('keep me\n')
    os.symlink(victim, os.path.join(instances, 'evil.console.log'))
    # Writers keep their files open in append mode (oslo.log, QEMU).
    writers = [open(path, 'a', encoding='utf-8') for path in (agent_log,
                                                             console)]
    try:
        for writer in writers:
            writer.write('before rotation\n' * 1000)
            writer.flush()
        result = run(tool('logrotate'), '-f', '-s',
                     str(tmp_path / 'state'), config)
        assert result.returncode == 0, result.stderr
        for writer in writers:
            writer.write('after rotation\n')
            writer.flush()
    finally:
        for writer in writers:
            writer.close()
    for path in (agent_log, console):
        # Truncated in place: the writer goes on at the start of the file.
        with open(path, encoding='utf-8') as log:
            assert log.read() == 'after rotation\n', path
        with open(path + '.1', encoding='utf-8') as rotated:
            assert rotated.read() == 'before rotation\n' * 1000, path
    # A symbolic link is never followed.
    assert victim.read_text() == 'keep me\n'
    assert not os.path.exists(os.path.join(instances, 'evil.console.log.1'))
