"""The hypervisor driver interface and its loader.

A driver runs VMs for the manager: create, suspend, resume, destroy,
resize and confirm, addresses, usage, listing, and the capacity of the
host. The libvirt driver (standalone hosts) and the Nova driver (OpenStack
clouds) implement it with the same semantics and errors, so the manager
never knows which one it drives.

Every method raises :class:`rapid_vmm.exception.DriverError` (or a more
precise typed error) on failure, after cleaning up whatever it made half.
"""

import abc
from collections.abc import Callable
import dataclasses
import enum
import logging
from typing import Any

from oslo_config import cfg
import stevedore

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects

LOG = logging.getLogger(__name__)

DRIVER_NAMESPACE = 'rapid_vmm.virt.drivers'

#: Resources of ``get_vm_usage``.
USAGE_RESOURCES = ('cpu', 'memory', 'disk')


class PowerState(enum.Enum):
    """Power state of an instance as the hypervisor reports it."""

    RUNNING = 'running'
    SUSPENDED = 'suspended'
    SHUTOFF = 'shutoff'
    CRASHED = 'crashed'
    BUILDING = 'building'
    UNKNOWN = 'unknown'


@dataclasses.dataclass(frozen=True)
class HostCapacity:
    """What the host offers VMs before allocation ratios are applied."""

    vcpus: int
    memory_mb: int
    disk_gb: int


@dataclasses.dataclass
class Instance:
    """An instance of ours found on the hypervisor.

    Built from the metadata the driver stored with the instance, so the
    state of the agent can be rebuilt from the hypervisor alone.
    """

    driver_id: str
    name: str
    power_state: PowerState
    user_id: int
    helper: int
    os_type: int
    vcpus: int
    memory_mb: int
    disk_gb: int
    gpu_cores: int = 0
    disk_path: str | None = None
    image: str | None = None


@dataclasses.dataclass
class CreateResult:
    """What ``create`` made: its id and, for local disks, the disk path."""

    driver_id: str
    disk_path: str | None = None
    image: str | None = None


class ComputeDriver(abc.ABC):
    """Base class of hypervisor drivers."""

    #: Name under which the driver is registered (``compute_driver``).
    name: str = ''

    def __init__(self, conf: cfg.ConfigOpts):
        self.conf = conf

    @classmethod  # noqa: B027 - optional hook
    def validate_config(cls, conf: cfg.ConfigOpts) -> None:
        """Check the driver's options before the agent starts.

        Optional: the default accepts any configuration.

        :raises ConfigError: with a one-line reason.
        """

    @abc.abstractmethod
    def init_host(self) -> None:
        """Connect to the hypervisor or cloud; called once at start."""

    def set_event_callback(  # noqa: B027 - optional hook
            self, callback: Callable[[str | None, str], None]) -> None:
        """Receive ``callback(instance_name, event)`` for hypervisor events
        (drivers that have events call it; ``None, 'reconnected'`` after a
        lost connection came back)."""

    def sample_cpu(self, vms: list[objects.Vm]) -> None:  # noqa: B027
        """Cache a CPU sample of ``vms`` (called every report cycle), so
        that the next ``usage(..., 'cpu')`` has a rate to give."""

    def post_start(self) -> None:  # noqa: B027 - optional hook
        """Start background work; called after the start-up reconcile."""

    def cleanup_host(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads; called once at stop."""

    @abc.abstractmethod
    def host_capacity(self) -> HostCapacity:
        """Return vCPUs, memory MB and disk GB the host has for VMs."""

    @abc.abstractmethod
    def create(self, vm: objects.Vm) -> CreateResult:
        """Create and start ``vm`` (name, size, OS type, helper index).

        On failure everything made is removed before the error is raised.
        """

    @abc.abstractmethod
    def wait_for_ip(self, vm: objects.Vm,
                    timeout: float | None = None) -> str:
        """Return the VM's IP address, waiting up to ``timeout`` seconds.

        ``timeout`` None waits as long as the driver's options say; 0 looks
        once without waiting.

        :raises DriverError: when no address appears in time.
        """

    @abc.abstractmethod
    def suspend(self, vm: objects.Vm) -> None:
        """Suspend a running VM."""

    @abc.abstractmethod
    def resume(self, vm: objects.Vm) -> None:
        """Resume a suspended VM."""

    @abc.abstractmethod
    def destroy(self, vm: objects.Vm) -> None:
        """Remove the VM and its disk. Absent parts are not an error."""

    @abc.abstractmethod
    def resize(self, vm: objects.Vm, new_type: flavors.VmType) -> None:
        """Change the VM to ``new_type``; ``confirm_resize`` completes it."""

    @abc.abstractmethod
    def confirm_resize(self, vm: objects.Vm) -> None:
        """Confirm a resize; a VM with no resize pending is left alone."""

    @abc.abstractmethod
    def usage(self, vms: list[objects.Vm],
              resource: str) -> dict[int, dict[str, Any]]:
        """Return per-user usage figures of ``resource`` for ``vms``.

        Keys of the inner dicts: cpu: ``cpu_util_percent``; memory:
        ``memory_mb``, ``memory_used_mb``; disk: ``capacity_bytes``,
        ``allocation_bytes`` (what the guest wrote; for a qcow2 overlay,
        the highest written offset) and, where known, ``physical_bytes``
        (what the disk file takes on the host). A figure the hypervisor
        does not report is None, never a made-up number.
        """

    @abc.abstractmethod
    def list_instances(self) -> list[Instance]:
        """Return every instance that this agent made on the hypervisor.

        :raises DriverError: when the hypervisor cannot be asked; callers
            then treat every VM as unknown, never as deleted.
        """

    def get_instance(self, name: str) -> Instance | None:
        """Return our instance called ``name`` as it is now, or None.

        Drivers override this with a direct lookup; reconciliation uses it
        to confirm a difference before acting on it.
        """
        for instance in self.list_instances():
            if instance.name == name:
                return instance
        return None

    def cleanup_orphans(self, known_disks: set[str]) -> list[str]:
        """Remove disks this driver made that no record knows; list them."""
        return []


def driver_name(conf: cfg.ConfigOpts) -> str:
    """Return the configured driver name, honouring the deprecated alias."""
    if conf.openstack_support is not None:
        alias = 'nova' if conf.openstack_support else 'libvirt'
        LOG.warning('openstack_support is deprecated; it selects the %s '
                    'driver. Use compute_driver = %s.', alias, alias)
        return alias
    return conf.compute_driver


def driver_class(conf: cfg.ConfigOpts) -> type[ComputeDriver]:
    """Return the driver class selected by the configuration.

    :raises ConfigError: if the driver cannot be loaded.
    """
    name = driver_name(conf)
    try:
        manager = stevedore.DriverManager(DRIVER_NAMESPACE, name,
                                          invoke_on_load=False)
    except (stevedore.exception.NoMatches, ImportError, RuntimeError) as exc:
        raise exception.ConfigError(
            reason=f'compute_driver {name!r} cannot be loaded: {exc}'
        ) from None
    return manager.driver


def load_driver(conf: cfg.ConfigOpts) -> ComputeDriver:
    """Instantiate the configured driver."""
    return driver_class(conf)(conf)
