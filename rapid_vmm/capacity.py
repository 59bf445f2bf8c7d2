"""What the host can still give VMs: overcommit, reservations, GPU cores.

Host capacity comes from the driver (libvirt node info or the Nova
hypervisor) and is multiplied by the allocation ratios; every VM that
holds resources (running, suspended or being built; not stopped) is
subtracted. A type is available when one more VM of it fits.
"""

import dataclasses

from oslo_config import cfg

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects
from rapid_vmm.virt import driver


@dataclasses.dataclass(frozen=True)
class Usage:
    vcpus: int = 0
    memory_mb: int = 0
    disk_gb: int = 0
    gpu_cores: int = 0


@dataclasses.dataclass(frozen=True)
class Limits:
    """The most VMs may be given in total, after ratios and reservations."""

    vcpus: float
    memory_mb: float
    disk_gb: float
    gpu_cores: int  # 0 = not accounted

    @classmethod
    def from_host(cls, conf: cfg.ConfigOpts,
                  host: driver.HostCapacity) -> 'Limits':
        memory = max(host.memory_mb - conf.reserved_host_memory_mb, 0)
        return cls(vcpus=host.vcpus * conf.cpu_allocation_ratio,
                   memory_mb=memory * conf.ram_allocation_ratio,
                   disk_gb=host.disk_gb * conf.disk_allocation_ratio,
                   gpu_cores=conf.gpu.total_cores)


def holds_resources(vm: objects.Vm) -> bool:
    return vm.status != objects.VmStatus.STOPPED


def current_usage(vms: list[objects.Vm]) -> Usage:
    held = [vm for vm in vms if holds_resources(vm)]
    return Usage(vcpus=sum(vm.vcpus for vm in held),
                 memory_mb=sum(vm.memory_mb for vm in held),
                 disk_gb=sum(vm.disk_gb for vm in held),
                 gpu_cores=sum(vm.gpu_cores for vm in held))


def shortfall(limits: Limits, usage: Usage, vm_type: flavors.VmType,
              gpu_cores: int = 0) -> str | None:
    """Return why ``vm_type`` does not fit, or None when it fits."""
    checks = (('vCPUs', usage.vcpus + vm_type.vcpus, limits.vcpus),
              ('memory MB', usage.memory_mb + vm_type.memory_mb,
               limits.memory_mb),
              ('disk GB', usage.disk_gb + vm_type.disk_gb, limits.disk_gb))
    for name, wanted, limit in checks:
        if wanted > limit:
            return f'{name}: {wanted} needed, {_number(limit)} allowed'
    if limits.gpu_cores and usage.gpu_cores + gpu_cores > limits.gpu_cores:
        return (f'GPU cores: {usage.gpu_cores + gpu_cores} needed, '
                f'{limits.gpu_cores} exist')
    return None


def _number(value: float) -> str:
    return f'{value:.0f}' if float(value).is_integer() else f'{value:.1f}'


def check(limits: Limits, vms: list[objects.Vm], vm_type: flavors.VmType,
          gpu_cores: int = 0, exclude_user: int | None = None) -> None:
    """:raises NoCapacity: when ``vm_type`` does not fit next to ``vms``."""
    others = [vm for vm in vms if vm.user_id != exclude_user]
    reason = shortfall(limits, current_usage(others), vm_type, gpu_cores)
    if reason:
        raise exception.NoCapacity(request=str(vm_type.as_list()),
                                   reason=reason)


def available_types(grid: flavors.Grid, limits: Limits,
                    vms: list[objects.Vm]) -> list[list[int]]:
    """Every grid type of which one more VM fits, as ``[vcpus, mem, disk]``."""
    usage = current_usage(vms)
    return [t.as_list() for t in grid.types
            if shortfall(limits, usage, t) is None]


#: Length of the original VMM's ``availableType`` string.
LEGACY_TYPE_DIGITS = 10


def legacy_available_types(grid: flavors.Grid, available: list[list[int]],
                           width: int = LEGACY_TYPE_DIGITS) -> str:
    """The original's ``availableType`` string: one digit per type number.

    Digit ``i`` is ``1`` when type ``i`` (the DS's type number, see
    :meth:`flavors.Grid.index`) still fits, else ``0``. The original sends
    10 digits; types past the width cannot be expressed and a grid with
    fewer types is padded with ``0``.
    """
    fits = {tuple(t) for t in available}
    digits = ['1' if tuple(t.as_list()) in fits else '0'
              for t in grid.types[:width]]
    return ''.join(digits).ljust(width, '0')
