"""The VM record and the constants that travel on the wire."""

import dataclasses
import enum
from typing import Any


class VmStatus(enum.IntEnum):
    """Status codes of a VM, as the DS and SLAM know them."""

    STARTED = 1
    SUSPENDED = 2
    RESUMED = 3
    STOPPED = 4


class TaskState(enum.Enum):
    """What the agent is doing to a VM; persisted before it acts, so that a
    restart finishes or rolls back what was in flight.

    ``UNKNOWN`` is not an operation: reconciliation sets it when the
    hypervisor cannot vouch for the VM's instance (absent but not yet
    confirmed, foreign or unreadable metadata, stopped by a fault).
    """

    NONE = ''
    BUILDING = 'building'
    RESUMING = 'resuming'
    SUSPENDING = 'suspending'
    RESIZING = 'resizing'
    DELETING = 'deleting'
    UNKNOWN = 'unknown'


class OsType(enum.IntEnum):
    LINUX = 0
    ANDROID = 1


class VmCategory(enum.IntEnum):
    NORMAL = 0
    HELPER = 1


RUNNING_STATUSES = (VmStatus.STARTED, VmStatus.RESUMED)

#: Keys of the VM record of SPEC section 4, in order.
RECORD_KEYS = ('user_id', 'vm_id', 'name', 'status', 'vcpus', 'memory_mb',
               'disk_gb', 'gpu_cores', 'os_type', 'helper', 'ip_address')


@dataclasses.dataclass
class Vm:
    """One VM of this host, as kept in the state database.

    ``user_id`` identifies it: a user has at most one VM per host. Helper
    VMs have negative user ids (-1, -2, ...) and ``helper`` = 1, 2, ...
    """

    user_id: int
    name: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    os_type: int = OsType.LINUX
    gpu_cores: int = 0
    helper: int = 0
    vm_id: int | None = None
    status: int = VmStatus.STARTED
    task_state: str = TaskState.NONE.value
    driver_id: str | None = None
    image: str | None = None
    disk_path: str | None = None
    ip_address: str | None = None
    as_ready: bool = False
    pending_resize: dict | None = None
    #: The most memory the instance may grow to (capacity accounts it).
    memory_max_mb: int = 0
    #: Suspended with its memory saved to disk: it holds no host RAM.
    saved: bool = False
    #: Why ``task_state`` is unknown, or what the hypervisor said.
    state_reason: str = ''
    #: How the VM's AS registered: 'rpc', 'legacy' or None (not yet).
    as_protocol: str | None = None
    #: What the operation in ``task_state`` wants (e.g. a resize target).
    intent: dict | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def is_running(self) -> bool:
        return self.status in RUNNING_STATUSES

    @property
    def is_helper(self) -> bool:
        return self.helper > 0

    @property
    def category(self) -> int:
        return VmCategory.HELPER if self.is_helper else VmCategory.NORMAL

    def to_record(self) -> dict[str, Any]:
        """Return the VM record of SPEC section 4 (plain JSON types)."""
        return {
            'user_id': self.user_id,
            'vm_id': self.vm_id,
            'name': self.name,
            'status': int(self.status),
            'vcpus': self.vcpus,
            'memory_mb': self.memory_mb,
            'disk_gb': self.disk_gb,
            'gpu_cores': self.gpu_cores,
            'os_type': int(self.os_type),
            'helper': self.helper,
            'ip_address': self.ip_address,
        }

    def copy(self, **changes: Any) -> 'Vm':
        return dataclasses.replace(self, **changes)
