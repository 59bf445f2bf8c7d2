"""Instance disks: qcow2 overlays of (or full copies of) a template.

Every disk operation goes through ``qemu-img``, the tool that owns the
format: ``qemu-img create -f qcow2 -b TEMPLATE -F FORMAT DISK SIZE`` for an
overlay (O(1): a few hundred KiB of metadata whatever the template's size),
``qemu-img info`` to read a template, ``qemu-img resize`` to grow a copy. A
copy itself is a plain file copy (the kernel's, through
:func:`shutil.copyfile`).

``qemu-img`` runs through :func:`qemu_img`: :func:`subprocess.run` with an
argument list (never a shell) and a timeout. Not through
oslo.concurrency's ``processutils``, whose extra fork of the whole agent
cost ~22 ms per call; ``subprocess`` spawns qemu-img directly.

Why ``qemu-img`` rather than libvirt's storage API: a storage volume with a
``<backingStore>`` needs a storage pool defined on ``images_path`` in the
hypervisor (and refreshed whenever a file changes behind libvirt's back),
its files are then created by libvirtd as its own user, and libvirt's test
driver (``test:///default``, the unit and benchmark hypervisor) only
pretends to create volumes. ``qemu-img`` works the same with every
connection URI, makes real files owned by the agent, and is what libvirt
itself runs for a qcow2 volume with a backing store.

Disks live in ``images_path`` and are named after their domain
(``<name>.qcow2`` or ``<name>.img``), so a disk can always be traced to its
VM; every file matching :data:`DISK_PATTERN` belongs to rapid-vmm.
"""

import json
import os
import re
import shutil
import subprocess
import threading

from oslo_log import log as logging

from rapid_vmm import exception

LOG = logging.getLogger(__name__)

GiB = 1024 ** 3
DISK_PATTERN = re.compile(r'^rapid-[A-Za-z0-9_.-]+\.(qcow2|img)(\.part)?$')
QEMU_IMG = 'qemu-img'
QEMU_IMG_TIMEOUT = 120
"""Seconds one ``qemu-img`` run may take (a resize or an info is
milliseconds; a stuck NFS mount is what this bounds)."""

# How much of qemu-img's stderr goes into an error message.
_STDERR_MAX = 500


class QemuImgError(Exception):
    """``qemu-img`` could not be run, timed out or failed."""


def qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> str:
    """Run ``qemu-img ARGS`` (no shell, bounded); return its stdout.

    :raises QemuImgError: when it cannot be started, runs past
        ``timeout`` seconds (it is killed) or exits non-zero (its stderr is
        in the message).
    """
    command = [QEMU_IMG, *args]
    try:
        done = subprocess.run(  # noqa: S603 - argument list, no shell
            command, capture_output=True, text=True, timeout=timeout,
            check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise QemuImgError(f'qemu-img {args[0]} did not finish within '
                           f'{timeout} s') from exc
    except OSError as exc:
        raise QemuImgError(f'cannot run qemu-img: {exc}') from exc
    if done.returncode != 0:
        stderr = ' '.join(done.stderr.split())[:_STDERR_MAX]
        raise QemuImgError(f'qemu-img {args[0]} exited with '
                           f'{done.returncode}: {stderr}')
    return done.stdout


def qemu_img_info(path: str) -> dict:
    """Return ``qemu-img info`` of ``path`` as a dict.

    :raises DriverError: when the file cannot be read as a disk image.
    """
    try:
        return json.loads(qemu_img('info', '--output=json', '--force-share',
                                   path))
    except (QemuImgError, ValueError) as exc:
        raise exception.DriverError(action='read image',
                                    reason=f'{path}: {exc}') from exc


class ImageBackend:
    """Makes and removes the instance disks of one ``images_path``."""

    def __init__(self, images_path: str, mode: str = 'overlay'):
        self.images_path = images_path
        self.mode = mode
        self._template_info: dict[str, dict] = {}
        self._lock = threading.Lock()

    def ensure_directory(self) -> None:
        os.makedirs(self.images_path, mode=0o755, exist_ok=True)

    def disk_path(self, name: str) -> str:
        suffix = '.qcow2' if self.mode == 'overlay' else '.img'
        return os.path.join(self.images_path, name + suffix)

    def template_info(self, template: str) -> dict:
        """``qemu-img info`` of a template, cached by path and mtime.

        :raises DriverError: when the template is missing or not an image.
        """
        try:
            key = f'{template}:{os.stat(template).st_mtime_ns}'
        except OSError as exc:
            raise exception.DriverError(action='read image',
                                        reason=f'{template}: {exc}') from exc
        with self._lock:
            info = self._template_info.get(key)
        if info is None:
            info = qemu_img_info(template)
            with self._lock:
                self._template_info[key] = info
        return info

    def disk_format(self, template: str) -> str:
        if self.mode == 'overlay':
            return 'qcow2'
        return self.template_info(template).get('format', 'raw')

    def create(self, template: str, path: str, size_gb: int,
               sync: bool = False) -> None:
        """Make the disk ``path`` from ``template``, ``size_gb`` large.

        The disk is never smaller than the template's virtual size. An
        overlay is made by ``qemu-img create`` with the template (absolute
        path) as its backing file; a copy is a copy, grown by ``qemu-img
        resize``. ``sync`` flushes the disk before returning. ``path`` must
        not exist. A failure leaves no file behind.

        :raises DriverError: when the disk cannot be made.
        """
        info = self.template_info(template)
        template_format = info.get('format', 'raw')
        size = max(int(size_gb) * GiB, int(info.get('virtual-size', 0)))
        try:
            if self.mode == 'overlay':
                # The name is reserved atomically first: qemu-img create
                # would overwrite an existing file.
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                 0o644))
                qemu_img('create', '-q', '-f', 'qcow2',
                         '-b', os.path.abspath(template),
                         '-F', template_format, path, str(size))
                if sync:
                    _fsync(path)
            else:
                if os.path.lexists(path):
                    raise FileExistsError(path)
                partial = path + '.part'
                shutil.copyfile(template, partial)
                if size > int(info.get('virtual-size', 0)):
                    self.resize(partial, size, template_format)
                if sync:
                    _fsync(partial)
                os.replace(partial, path)
        except FileExistsError as exc:
            raise exception.DriverError(
                action='create disk',
                reason=f'{path} exists already') from exc
        except (QemuImgError, exception.DriverError, OSError) as exc:
            self.delete(path)
            self.delete(path + '.part')
            reason = getattr(exc, 'kwargs', {}).get('reason', exc)
            raise exception.DriverError(
                action='create disk', reason=f'{path}: {reason}') from exc

    def resize(self, path: str, size: int, disk_format: str | None = None
               ) -> None:
        """Grow the disk ``path`` to ``size`` bytes (``qemu-img resize``).

        :raises DriverError: when qemu-img fails (the disk is unchanged).
        """
        args = ['resize', '-q']
        if disk_format:
            args += ['-f', disk_format]
        try:
            qemu_img(*args, path, str(int(size)))
        except QemuImgError as exc:
            raise exception.DriverError(action='resize disk',
                                        reason=f'{path}: {exc}') from exc

    def delete(self, path: str | None) -> None:
        """Remove a disk; a missing file is fine."""
        if not path:
            return
        try:
            os.unlink(path)
            LOG.debug('Deleted disk %s', path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            LOG.error('Cannot delete disk %s: %s', path, exc)

    def list_disks(self) -> list[str]:
        """Every file in ``images_path`` named like one of our disks."""
        try:
            names = os.listdir(self.images_path)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.images_path, name) for name in names
                      if DISK_PATTERN.match(name))

    def allocation(self, path: str) -> int | None:
        """Bytes the disk file occupies on the host, or None."""
        try:
            return os.stat(path).st_blocks * 512
        except OSError:
            return None


def _fsync(path: str) -> None:
    with open(path, 'rb') as disk:
        os.fsync(disk.fileno())
