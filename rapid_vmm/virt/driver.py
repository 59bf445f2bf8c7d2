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
import threading
import time
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
import stevedore
import tenacity

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
    #: Paused or saved by a suspend (``Instance.saved`` tells which).
    SUSPENDED = 'suspended'
    SHUTOFF = 'shutoff'
    CRASHED = 'crashed'
    #: Present but stopped by a fault, not by a request: paused on an I/O
    #: error, Nova's ERROR. Never reported as suspended.
    ERROR = 'error'
    BUILDING = 'building'
    UNKNOWN = 'unknown'


class Presence(enum.Enum):
    """What the hypervisor says about the instance of one VM record.

    Only ``ABSENT`` means gone, and only when the hypervisor answered a
    lookup by the instance's UUID (or, for a record that has none yet, by
    its name) with "no such instance". ``FOREIGN`` and ``UNREADABLE``
    instances exist and are never touched; ``UNKNOWN`` means the question
    could not be asked.
    """

    OURS = 'ours'
    FOREIGN = 'foreign'
    UNREADABLE = 'unreadable'
    ABSENT = 'absent'
    UNKNOWN = 'unknown'


#: ``claim_from`` of :meth:`ComputeDriver.update_metadata` that takes over
#: an instance with no metadata of ours at all, found by the name of its
#: record (a VM imported from the original Java VMM).
CLAIM_UNMARKED = '*unmarked*'


@dataclasses.dataclass(frozen=True)
class HostCapacity:
    """What the host offers VMs before allocation ratios are applied."""

    vcpus: int
    memory_mb: int
    disk_gb: int


@dataclasses.dataclass
class Instance:
    """An instance found on the hypervisor, with our metadata.

    Built from the metadata the driver stored with the instance, so the
    state of the agent can be rebuilt from the hypervisor alone:
    ``identity`` holds the VMM's ``vmm_id`` (and ``slam_host``,
    ``slam_port``), ``vm_id`` the DS id of the VM.
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
    owner: str | None = None
    vm_id: int | None = None
    identity: dict = dataclasses.field(default_factory=dict)
    #: The most memory the instance can grow to without a restart.
    memory_max_mb: int = 0
    #: Suspended with its memory written to disk (libvirt managed save,
    #: Nova suspend): it holds no host RAM.
    saved: bool = False
    #: Why the power state is what it is, when the hypervisor says
    #: (e.g. ``paused: I/O error``).
    state_reason: str = ''


@dataclasses.dataclass
class Observation:
    """The hypervisor's answer about one VM record (:meth:`observe`).

    ``instance`` is set for ``OURS``; for ``FOREIGN`` it is set when the
    metadata could be read (its ``owner`` says whose it is). ``name`` and
    ``driver_id`` are what the hypervisor has; ``reason`` says why an
    instance is foreign, unreadable or unknown.
    """

    presence: Presence
    instance: Instance | None = None
    name: str | None = None
    driver_id: str | None = None
    reason: str = ''


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
        #: Set when the agent stops: every wait of the driver ends.
        self._stopping = threading.Event()

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
    def create(self, vm: objects.Vm,
               identity: dict | None = None) -> CreateResult:
        """Create and start ``vm`` (name, size, OS type, helper index).

        The instance's metadata carries the owner (``host``), the record's
        fields, ``vm.memory_max_mb`` and ``identity`` (``vmm_id``, ...).
        On failure everything made is removed before the error is raised.

        :raises InvalidRequest: for an OS type with no template or image.
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
    def suspend(self, vm: objects.Vm) -> bool:
        """Suspend a running VM; True when its memory was released to disk
        (``suspend_mode = save``; Nova's suspend), False when it is paused
        in RAM."""

    @abc.abstractmethod
    def resume(self, vm: objects.Vm) -> None:
        """Resume a suspended VM."""

    @abc.abstractmethod
    def destroy(self, vm: objects.Vm) -> None:
        """Remove the VM's instance and its disk (an explicit request).

        The instance is found by ``vm.driver_id`` (or by name when the
        record has none). Absent parts are not an error; a disk that
        another instance uses is kept.

        :raises InstanceNotOurs: when the instance found has another owner
            or unreadable metadata: nothing is destroyed.
        """

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
    def list_instances(self, owners: set[str] | None = None
                       ) -> list[Instance]:
        """Every instance whose metadata names one of ``owners`` (default:
        this agent's ``host``) as its owner: the candidates for adoption.

        :raises DriverError: when the hypervisor cannot be asked; callers
            then treat every VM as unknown, never as deleted.
        """

    def observe(self, vms: list[objects.Vm]) -> dict[str, Observation]:
        """What the hypervisor says about the instance of each record.

        Keyed by ``vm.name``. Each record's instance is looked up by its
        ``driver_id`` (libvirt UUID, Nova server id), or by its name when
        the record has no id yet (a start cut short). ``ABSENT`` only when
        that lookup answered "no such instance"; any other failure for one
        VM is ``UNKNOWN`` for that VM.

        :raises DriverError: when the hypervisor cannot be asked at all.
        """
        raise NotImplementedError

    def update_metadata(self, vm: objects.Vm, identity: dict,
                        claim_from: str | None = None) -> bool:
        """Write ``vm.vm_id``, ``identity`` (``vmm_id``, ``slam_host``,
        ``slam_port``; a key left out is removed), the record's fields and
        this agent's ``host`` as owner into the metadata of the VM's
        instance (found by ``driver_id``, else by name), so a lost state
        can be rebuilt from it.

        :param claim_from: a previous ``host`` of this agent (a declared
            rename): an instance owned by it is taken over; or
            :data:`CLAIM_UNMARKED`: an instance with no metadata of ours
            at all (found by the record's name) is taken over.
        :returns: True when written now; False when the hypervisor defers
            it (Nova refuses metadata changes while a resize waits for its
            confirmation: :meth:`confirm_resize` writes it).
        :raises InstanceNotOurs: when the instance belongs to another owner
            or its metadata is missing or unreadable (unless claimed).
        :raises DriverError: when the instance does not exist or the
            hypervisor refuses.
        """
        raise NotImplementedError

    def memory_ceiling_mb(self, memory_mb: int) -> int:
        """The maximum memory an instance of ``memory_mb`` is defined with:
        what it may grow to without a restart, and what capacity accounts.

        Default: its own size (no growth without a restart).
        """
        return memory_mb

    def cleanup_orphans(self, known_disks: set[str]) -> list[str]:
        """Delayed clean-up of disks that no record and no instance uses.

        A disk is a candidate only when no record knows it and no instance
        of any owner uses it; it is moved aside first and deleted only
        after a grace period. Does nothing when the hypervisor cannot be
        asked. Returns the paths moved aside or deleted in this pass.
        """
        return []

    def connection_state(self) -> str:
        """A few words on the driver's connection, for diagnostics: e.g.
        ``connected to URI since <ISO time>`` or ``reconnecting to URI
        since <ISO time> (N failed attempts; last error: ...)``."""
        return 'unknown'


def poll_for_address(vm, find: Callable[[Any], str | None], timeout: float,
                     interval: float, stopping: threading.Event | None,
                     what: str = 'address') -> str:
    """``find(vm)`` every ``interval`` s until it gives an address, for at
    most ``timeout`` s (see :func:`poll`); that address.

    :raises DriverError: when there is none by then.
    """
    ip = poll(lambda: find(vm) or None, timeout, interval, stopping)
    if not ip:
        raise exception.DriverError(
            action='find IP address',
            reason=f'{vm.name} has no {what} after {timeout} s')
    return ip


def poll(func: Callable[[], Any], timeout: float, interval: float,
         stopping: threading.Event | None = None) -> Any:
    """Call ``func`` every ``interval`` s until it returns something else
    than None, for at most ``timeout`` s; that value, or None.

    Stop-aware: ``stopping`` (the driver's stop) ends the wait at once.
    ``timeout`` 0 calls ``func`` once.
    """
    stops = tenacity.stop_after_delay(max(timeout, 0))
    sleep = time.sleep
    if stopping is not None:
        stops = stops | tenacity.stop_when_event_set(stopping)
        sleep = stopping.wait
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda result: result is None),
        wait=tenacity.wait_fixed(interval), stop=stops, sleep=sleep,
        retry_error_callback=lambda retry_state: None)
    return retrying(func)


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
