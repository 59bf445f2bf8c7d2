"""The grid of VM types (``vm_types``) and rounding of requests onto it."""

import bisect
import dataclasses
import itertools
import sys

from rapid_vmm import exception


@dataclasses.dataclass(frozen=True, order=True)
class VmType:
    """One VM type of the grid: vCPUs, memory in MB, disk in GB."""

    vcpus: int
    memory_mb: int
    disk_gb: int

    @property
    def key(self) -> str:
        """``vcpus_memoryMB_diskGB``, the key of ``nova.flavors``."""
        return f'{self.vcpus}_{self.memory_mb}_{self.disk_gb}'

    def as_list(self) -> list[int]:
        return [self.vcpus, self.memory_mb, self.disk_gb]


@dataclasses.dataclass(frozen=True)
class Grid:
    """The three ascending value lists whose product is the set of types.

    The index of a type (its ``vm_type`` number for the DS) follows the
    original's order: vCPU major, then memory, then disk.
    """

    vcpus: tuple[int, ...]
    memory_mb: tuple[int, ...]
    disk_gb: tuple[int, ...]

    @property
    def types(self) -> list[VmType]:
        return [VmType(c, m, d) for c, m, d in
                itertools.product(self.vcpus, self.memory_mb, self.disk_gb)]

    @property
    def smallest(self) -> VmType:
        return VmType(self.vcpus[0], self.memory_mb[0], self.disk_gb[0])

    @property
    def largest(self) -> VmType:
        return VmType(self.vcpus[-1], self.memory_mb[-1], self.disk_gb[-1])

    def index(self, vm_type: VmType) -> int:
        """Return the type number of ``vm_type`` (0-based)."""
        try:
            i = self.vcpus.index(vm_type.vcpus)
            j = self.memory_mb.index(vm_type.memory_mb)
            k = self.disk_gb.index(vm_type.disk_gb)
        except ValueError:
            raise exception.InvalidRequest(
                reason=f'{vm_type} is not a type of the grid') from None
        return (i * len(self.memory_mb) + j) * len(self.disk_gb) + k

    def round_down(self, vcpus: int, memory_mb: int, disk_gb: int) -> VmType:
        """Round a request down to the grid, each dimension on its own.

        A value under the smallest of its list is raised to it (the
        original's rule); 0 therefore means "the smallest".
        """
        return VmType(_floor(self.vcpus, vcpus),
                      _floor(self.memory_mb, memory_mb),
                      _floor(self.disk_gb, disk_gb))


def _floor(values: tuple[int, ...], wanted: int) -> int:
    pos = bisect.bisect_right(values, wanted)
    return values[max(pos - 1, 0)]


def parse_grid(text: str) -> Grid:
    """Parse ``"1,2,4 x 1024,2048,4096 x 20,40"`` into a :class:`Grid`.

    :raises ConfigError: unless there are three non-empty lists of positive
        (disk: non-negative) integers, each strictly ascending.
    """
    parts = [p.strip() for p in str(text).lower().split('x')]
    if len(parts) != 3:
        raise exception.ConfigError(
            reason=f'vm_types {text!r}: expected three lists separated by '
                   '"x" (vCPUs x memory MB x disk GB)')
    lists = []
    for name, part, minimum in zip(('vCPU', 'memory', 'disk'), parts,
                                   (1, 1, 0), strict=True):
        try:
            values = tuple(int(v) for v in part.split(','))
        except ValueError:
            raise exception.ConfigError(
                reason=f'vm_types {text!r}: the {name} list {part!r} is not '
                       'a comma-separated list of integers') from None
        if any(v < minimum for v in values):
            raise exception.ConfigError(
                reason=f'vm_types {text!r}: {name} values must be >= '
                       f'{minimum}')
        if list(values) != sorted(set(values)):
            raise exception.ConfigError(
                reason=f'vm_types {text!r}: the {name} list must be '
                       'strictly ascending')
        lists.append(values)
    return Grid(*lists)


USAGE = 'usage: python -m rapid_vmm.flavors GRID  (e.g. "1,2 x 1024 x 20")'


def main(argv: list[str] | None = None) -> int:
    """``python -m rapid_vmm.flavors GRID``: the types of a ``vm_types`` grid.

    Prints one line per type, in type-number order: its key
    (``vcpus_memoryMB_diskGB``, as in ``[nova] flavors``), then vCPUs,
    memory MB and disk GB, separated by spaces. A bad grid prints one line
    on stderr and exits 1; a wrong number of arguments exits 2. This is the
    parser the agent uses, for tools that need the grid (the devstack
    plugin) instead of parsing it again.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        grid = parse_grid(args[0])
    except exception.ConfigError as exc:
        print(f'rapid_vmm.flavors: {exc}', file=sys.stderr)
        return 1
    for vm_type in grid.types:
        print(vm_type.key, vm_type.vcpus, vm_type.memory_mb, vm_type.disk_gb)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
