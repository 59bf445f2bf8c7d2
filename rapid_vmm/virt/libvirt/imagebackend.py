"""Instance disks: qcow2 overlays of (or full copies of) a template.

Overlays are written in-process (:mod:`rapid_vmm.virt.libvirt.qcow2`);
copies, resizes and reading a template's format go through ``qemu-img``.

Disks live in ``images_path`` and are named after their domain
(``<name>.qcow2`` or ``<name>.img``), so a disk can always be traced to its
VM; every file matching :data:`DISK_PATTERN` belongs to rapid-vmm and one
that no record knows is an orphan.

``qemu-img`` runs as an argument list through oslo.concurrency, with a
timeout, never through a shell.
"""

import json
import os
import re
import shutil
import threading

from oslo_concurrency import processutils
from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm.virt.libvirt import qcow2

LOG = logging.getLogger(__name__)

GiB = 1024 ** 3
DISK_PATTERN = re.compile(r'^rapid-[A-Za-z0-9_.-]+\.(qcow2|img)(\.part)?$')
QEMU_IMG_TIMEOUT = 120


def qemu_img_info(path: str) -> dict:
    """Return ``qemu-img info`` of ``path`` as a dict.

    :raises DriverError: when the file cannot be read as a disk image.
    """
    try:
        out, _err = processutils.execute(
            'qemu-img', 'info', '--output=json', '--force-share', path,
            timeout=QEMU_IMG_TIMEOUT)
        return json.loads(out)
    except (processutils.ProcessExecutionError, OSError,
            ValueError) as exc:
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
        """``qemu-img info`` of a template, cached by path and mtime."""
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
        overlay is written in-process (:mod:`qcow2`); a copy is a copy.
        ``sync`` flushes the disk before returning. A failure leaves no
        file behind.

        :raises DriverError: when the disk cannot be made.
        """
        info = self.template_info(template)
        size = max(int(size_gb) * GiB, int(info.get('virtual-size', 0)))
        try:
            if self.mode == 'overlay':
                qcow2.create_overlay(path, os.path.abspath(template),
                                     info.get('format', 'raw'), size,
                                     sync=sync)
            else:
                partial = path + '.part'
                shutil.copyfile(template, partial)
                if size > int(info.get('virtual-size', 0)):
                    processutils.execute(
                        'qemu-img', 'resize', '-q', '-f',
                        info.get('format', 'raw'), partial, str(size),
                        timeout=QEMU_IMG_TIMEOUT)
                if sync:
                    with open(partial, 'rb') as disk:
                        os.fsync(disk.fileno())
                os.replace(partial, path)
        except FileExistsError as exc:
            raise exception.DriverError(
                action='create disk',
                reason=f'{path} exists already') from exc
        except (processutils.ProcessExecutionError, OSError,
                ValueError) as exc:
            self.delete(path)
            self.delete(path + '.part')
            raise exception.DriverError(
                action='create disk', reason=f'{path}: {exc}') from exc

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
