"""Delayed clean-up of orphan instance disks.

A file of ``images_path`` named like one of our disks
(:data:`imagebackend.DISK_PATTERN`) is a *candidate* only when

* no VM record knows it (``known``),
* no domain of any owner uses it (``in_use``: every domain's XML, active
  and inactive, with backing chains),
* it is not a ready disk of the image pool,
* it is not being made right now (``in_flight``), and it has not been
  touched for :data:`MIN_AGE` seconds.

A candidate is first moved aside, into ``<images_path>/.orphans/`` under the
name ``<epoch seconds>-<file name>`` (a rename in the same directory tree:
atomic, nothing copied), and deleted only when it stayed there, still
unclaimed, for the grace period. A file aside that a record or a domain
claims again goes back to its place. Every move, restore and delete is
logged at WARNING with its reason.

The caller computes ``in_use`` from libvirt; when libvirt cannot be asked,
the caller does not run a pass at all.
"""

from collections.abc import Callable
from collections.abc import Iterable
import os
import re
import threading
import time

from oslo_log import log as logging

from rapid_vmm.virt.libvirt import imagebackend

LOG = logging.getLogger(__name__)

ORPHANS_DIR = '.orphans'
#: Seconds a file must be left untouched before it can be a candidate (a
#: disk being made, or made a moment ago, is never one).
MIN_AGE = 300.0
_ASIDE_NAME = re.compile(r'^(\d+)-(.+)$')


def _real(path: str) -> str:
    return os.path.realpath(path)


class OrphanDisks:
    """The delayed clean-up of one ``images_path``.

    :param grace_period: seconds a file stays aside before it is deleted.
    :param is_pool_disk: True for a ready pool disk (never an orphan).
    :param clock: wall-clock time (the timestamps are in file names).
    """

    def __init__(self, images_path: str, grace_period: float,
                 is_pool_disk: Callable[[str], bool] = lambda path: False,
                 min_age: float = MIN_AGE,
                 clock: Callable[[], float] = time.time):
        self.images_path = images_path
        self.grace_period = grace_period
        self.is_pool_disk = is_pool_disk
        self.min_age = min_age
        self.clock = clock
        self._lock = threading.Lock()

    @property
    def aside_path(self) -> str:
        return os.path.join(self.images_path, ORPHANS_DIR)

    def aside(self) -> list[str]:
        """Paths of the files moved aside, oldest first."""
        try:
            names = os.listdir(self.aside_path)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.aside_path, name) for name in names
                      if _ASIDE_NAME.match(name))

    def run(self, known: Iterable[str | None], in_use: Iterable[str],
            in_flight: Iterable[str] = ()) -> list[str]:
        """One pass; returns the paths moved aside (their former path) or
        deleted (their path aside) in it."""
        known_real = {_real(path) for path in known if path}
        used_real = {_real(path) for path in in_use if path}
        flight_real = {_real(path) for path in in_flight if path}
        claimed = known_real | used_real | flight_real
        with self._lock:
            done = self._expire(claimed)
            done += self._move_candidates(claimed)
        return done

    def _expire(self, claimed: set[str]) -> list[str]:
        now = self.clock()
        deleted = []
        for path in self.aside():
            match = _ASIDE_NAME.match(os.path.basename(path))
            moved_at, name = int(match.group(1)), match.group(2)
            original = os.path.join(self.images_path, name)
            if _real(original) in claimed or _real(path) in claimed:
                self._restore(path, original)
                continue
            if now - moved_at < self.grace_period:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                LOG.error('Cannot delete orphan disk %s: %s', path, exc)
                continue
            LOG.warning('Deleted orphan disk %s (was %s): unused by every '
                        'VM record and every domain for %d s since it was '
                        'moved aside', path, original, now - moved_at)
            deleted.append(path)
        return deleted

    def _restore(self, path: str, original: str) -> None:
        if os.path.lexists(original):
            LOG.error('Orphan disk %s is claimed again but %s exists; left '
                      'aside for the operator', path, original)
            return
        try:
            os.rename(path, original)
        except OSError as exc:
            LOG.error('Cannot restore disk %s to %s: %s', path, original,
                      exc)
            return
        LOG.warning('Restored disk %s to %s: a VM record or a domain uses '
                    'it again', path, original)

    def _move_candidates(self, claimed: set[str]) -> list[str]:
        now = self.clock()
        moved = []
        for path in self._disks():
            if _real(path) in claimed or self.is_pool_disk(path):
                continue
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            if now - stat.st_mtime < self.min_age:
                continue
            target = os.path.join(self.aside_path,
                                  f'{int(now)}-{os.path.basename(path)}')
            try:
                os.makedirs(self.aside_path, mode=0o755, exist_ok=True)
                os.rename(path, target)
            except OSError as exc:
                LOG.error('Cannot move orphan disk %s aside: %s', path, exc)
                continue
            LOG.warning('Moved orphan disk %s to %s: no VM record knows it '
                        'and no domain of any owner uses it; it is deleted '
                        'after %d s unless claimed again', path, target,
                        self.grace_period)
            moved.append(path)
        return moved

    def _disks(self) -> list[str]:
        try:
            names = os.listdir(self.images_path)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.images_path, name) for name in names
                      if imagebackend.DISK_PATTERN.match(name))
