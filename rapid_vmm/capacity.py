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


def held_by(vm: objects.Vm) -> Usage:
    """What one VM holds of the host.

    Memory is accounted at the VM's ceiling (what it may grow to without a
    restart); a VM being resized holds the larger of both sizes until the
    resize is done; a suspended VM whose memory was saved to disk holds
    none; a stopped VM holds nothing.
    """
    if not holds_resources(vm):
        return Usage()
    vcpus, memory_mb, disk_gb = vm.vcpus, max(vm.memory_mb,
                                              vm.memory_max_mb), vm.disk_gb
    target = (vm.intent or {}).get('to')
    if (vm.intent or {}).get('op') == 'resize' and target:
        vcpus = max(vcpus, int(target[0]))
        memory_mb = max(memory_mb, int(target[1]))
        disk_gb = max(disk_gb, int(target[2]))
    if vm.saved and vm.status == objects.VmStatus.SUSPENDED:
        memory_mb = 0
    return Usage(vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb,
                 gpu_cores=vm.gpu_cores)


def current_usage(vms: list[objects.Vm]) -> Usage:
    held = [held_by(vm) for vm in vms]
    return Usage(vcpus=sum(u.vcpus for u in held),
                 memory_mb=sum(u.memory_mb for u in held),
                 disk_gb=sum(u.disk_gb for u in held),
                 gpu_cores=sum(u.gpu_cores for u in held))


def usage_in(txn, exclude_user: int | None = None) -> Usage:
    """What every VM but ``exclude_user``'s holds, read in the state
    transaction ``txn`` (summed by SQLite: one start does not parse every
    record while it holds the state's write lock)."""
    (vcpus, memory_mb, disk_gb, gpu_cores), resizing = txn.held_sums(
        exclude_user)
    extra = current_usage(resizing)
    return Usage(vcpus=vcpus + extra.vcpus,
                 memory_mb=memory_mb + extra.memory_mb,
                 disk_gb=disk_gb + extra.disk_gb,
                 gpu_cores=gpu_cores + extra.gpu_cores)


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


def check(limits: Limits, vms: list[objects.Vm] | Usage,
          vm_type: flavors.VmType, gpu_cores: int = 0,
          exclude_user: int | None = None,
          memory_mb: int | None = None) -> None:
    """:raises NoCapacity: when ``vm_type`` does not fit next to ``vms``
    (the records, or what they hold: a :class:`Usage`, see
    :func:`usage_in`).

    ``memory_mb``: the memory to account when it is not the type's own
    (a VM defined with a higher ceiling).
    """
    if isinstance(vms, Usage):
        usage = vms
    else:
        usage = current_usage([vm for vm in vms
                               if vm.user_id != exclude_user])
    wanted = vm_type
    if memory_mb is not None and memory_mb != vm_type.memory_mb:
        wanted = flavors.VmType(vm_type.vcpus, memory_mb, vm_type.disk_gb)
    reason = shortfall(limits, usage, wanted, gpu_cores)
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
