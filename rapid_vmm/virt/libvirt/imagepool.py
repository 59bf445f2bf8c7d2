"""Instance disks prepared ahead of requests (``libvirt.image_pool_size``).

The pool lives in ``images_path`` as files named
``rapid-pool-<template key>-<token>.qcow2`` (or ``.img`` in copy mode). A
disk is made as ``<name>.part`` and renamed when complete, so the
filesystem itself is the pool's durable state: after a crash, complete
files are reused and ``.part`` files are orphans removed at start. A taken
disk is renamed to the VM's disk path (same directory: atomic) and grown
to the VM's size if needed.

A background thread keeps ``image_pool_size`` disks of the normal template
ready; helper VMs, rare, get their disks on demand.
"""

import hashlib
import os
import threading
import uuid

from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm.virt.libvirt import imagebackend

LOG = logging.getLogger(__name__)

POOL_PREFIX = 'rapid-pool-'
REFILL_INTERVAL = 30.0


def template_key(template: str) -> str:
    """Short stable key of a template path, part of its pool files' names."""
    return hashlib.sha256(os.path.abspath(template).encode()).hexdigest()[:12]


class ImagePool:
    """Keeps ``size`` ready disks of ``template`` in ``images.images_path``.

    :param images: the :class:`imagebackend.ImageBackend` that makes disks.
    :param size_gb: the virtual size pool disks are made with (the smallest
        disk of the grid); a VM that needs more is grown on take.
    """

    def __init__(self, images: imagebackend.ImageBackend, template: str,
                 size: int, size_gb: int):
        self.images = images
        self.template = template
        self.size = size
        self.size_gb = size_gb
        self._key = template_key(template)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- files ------------------------------------------------------------

    @property
    def _suffix(self) -> str:
        return '.qcow2' if self.images.mode == 'overlay' else '.img'

    def _is_ready_file(self, name: str) -> bool:
        return (name.startswith(f'{POOL_PREFIX}{self._key}-') and
                name.endswith(self._suffix))

    def ready(self) -> list[str]:
        """Paths of the complete pool disks of this template, oldest first."""
        try:
            names = os.listdir(self.images.images_path)
        except FileNotFoundError:
            return []
        paths = [os.path.join(self.images.images_path, name)
                 for name in names if self._is_ready_file(name)]
        return sorted(paths, key=_mtime)

    def prepare_one(self) -> str:
        """Make one pool disk; returns its path."""
        token = uuid.uuid4().hex[:12]
        path = os.path.join(self.images.images_path,
                            f'{POOL_PREFIX}{self._key}-{token}{self._suffix}')
        partial = path + '.part'
        # Flushed before the rename: a complete name means complete data.
        self.images.create(self.template, partial, self.size_gb, sync=True)
        os.replace(partial, path)
        return path

    def take(self, path: str, size_gb: int) -> bool:
        """Move a ready disk to ``path`` (grown to ``size_gb``).

        Returns False when the pool is empty; the caller then makes the
        disk itself.
        """
        with self._lock:
            candidates = self.ready()
            if not candidates:
                return False
            source = candidates[0]
            os.replace(source, path)
        self._wakeup.set()
        if size_gb > self.size_gb:
            try:
                self.images.resize(path, size_gb * imagebackend.GiB)
            except exception.DriverError:
                self.images.delete(path)
                raise
        LOG.debug('Took pool disk %s for %s', source, path)
        return True

    def is_pool_file(self, path: str) -> bool:
        """True for a complete pool disk of this template (never orphan)."""
        return self._is_ready_file(os.path.basename(path))

    # -- refill thread -------------------------------------------------------

    def start(self) -> None:
        if self.size <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._refill_loop,
                                        name='image-pool', daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(10)

    def refill(self) -> int:
        """Make disks until ``size`` are ready; returns how many were made."""
        made = 0
        while not self._stopped.is_set() and len(self.ready()) < self.size:
            try:
                self.prepare_one()
            except exception.DriverError as exc:
                LOG.error('Cannot prepare a pool disk of %s: %s',
                          self.template, exc)
                break
            made += 1
        if made:
            LOG.info('Image pool of %s: %d disk(s) prepared, %d ready',
                     self.template, made, len(self.ready()))
        return made

    def _refill_loop(self) -> None:
        while not self._stopped.is_set():
            self.refill()
            self._wakeup.wait(REFILL_INTERVAL)
            self._wakeup.clear()


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
