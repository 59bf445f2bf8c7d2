"""A private libvirtd for tests that restart, freeze or kill the daemon.

Never the system libvirtd: this one has its own configuration, socket
directory, pid file and log, all in a temporary directory, and runs as an
unprivileged user (``nobody`` when the tests run as root), so it is a
*session* daemon with no access to the host's domains, networks or state.
Its executable is a symlink named :data:`PROCESS_NAME`, so tools that look
for ``libvirtd`` by name (``pgrep -x libvirtd``, ``pkill -x libvirtd``)
never see it.

The URI of its test driver is :attr:`PrivateLibvirtd.uri`
(``test+unix:///default?socket=...``): every call is a real RPC, and the
test driver's state lives as long as the daemon (a restart starts afresh).
"""

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import fixtures

PROCESS_NAME = 'rvmm-test-libvirtd'
START_TIMEOUT = 30.0


def libvirtd_binary() -> str | None:
    for path in ('/usr/sbin/libvirtd', shutil.which('libvirtd') or ''):
        if path and os.access(path, os.X_OK):
            return path
    return None


class PrivateLibvirtd(fixtures.Fixture):
    """Starts a private libvirtd; ``restart()``, ``kill()``, ``start()``,
    ``freeze()`` (SIGSTOP) and ``thaw()`` (SIGCONT) act on it only."""

    def _setUp(self):
        binary = libvirtd_binary()
        if binary is None:
            raise RuntimeError('libvirtd is not installed '
                               '(tools/system/setup-host.sh installs it)')
        self.dir = tempfile.mkdtemp(prefix='rvmm-libvirtd-')
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.run_dir = os.path.join(self.dir, 'run')
        self.home = os.path.join(self.dir, 'home')
        os.makedirs(self.run_dir)
        os.makedirs(self.home)
        self.socket = os.path.join(self.run_dir, 'libvirt-sock')
        self.pid_file = os.path.join(self.dir, 'libvirtd.pid')
        self.log_file = os.path.join(self.dir, 'libvirtd.log')
        self.config = os.path.join(self.dir, 'libvirtd.conf')
        with open(self.config, 'w', encoding='utf-8') as conf:
            conf.write(f'unix_sock_dir = "{self.run_dir}"\n'
                       'unix_sock_rw_perms = "0777"\n'
                       'unix_sock_ro_perms = "0777"\n'
                       'unix_sock_admin_perms = "0700"\n'
                       'auth_unix_rw = "none"\n'
                       'auth_unix_ro = "none"\n'
                       f'log_outputs = "3:file:{self.log_file}"\n')
        self.executable = os.path.join(self.dir, PROCESS_NAME)
        os.symlink(binary, self.executable)
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam('nobody')
            for root, dirs, files in os.walk(self.dir):
                for name in [root, *(os.path.join(root, n)
                                     for n in dirs + files)]:
                    os.lchown(name, self.user.pw_uid, self.user.pw_gid)
        self.uri = f'test+unix:///default?socket={self.socket}'
        self.process: subprocess.Popen | None = None
        self.addCleanup(self.kill)
        self.start()

    def start(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        env = {'HOME': self.home, 'PATH': '/usr/sbin:/usr/bin:/sbin:/bin',
               'XDG_RUNTIME_DIR': self.run_dir,
               'XDG_CONFIG_HOME': os.path.join(self.home, '.config'),
               'XDG_CACHE_HOME': os.path.join(self.home, '.cache')}
        kwargs = {}
        if self.user is not None:
            kwargs = {'user': self.user.pw_uid, 'group': self.user.pw_gid,
                      'extra_groups': []}
        with open(os.path.join(self.dir, 'stderr'), 'ab') as stderr:
            self.process = subprocess.Popen(
                [self.executable, '--config', self.config, '--pid-file',
                 self.pid_file], env=env, stdout=subprocess.DEVNULL,
                stderr=stderr, start_new_session=True, **kwargs)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket):
            if self.process.poll() is not None:
                raise RuntimeError(f'private libvirtd exited with '
                                   f'{self.process.returncode}: '
                                   f'{self.tail()}')
            if time.monotonic() > deadline:
                raise RuntimeError(f'private libvirtd did not listen in '
                                   f'{START_TIMEOUT} s: {self.tail()}')
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the daemon (a crash); nothing else is signalled."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def tail(self) -> str:
        text = ''
        for name in ('stderr', 'libvirtd.log'):
            try:
                with open(os.path.join(self.dir, name), encoding='utf-8',
                          errors='replace') as log:
                    text += log.read()[-2000:]
            except OSError:
                pass
        return text
