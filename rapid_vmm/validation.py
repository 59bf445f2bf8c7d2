"""Checks of RPC arguments: each returns the clean value or raises.

Every function raises :class:`rapid_vmm.exception.InvalidRequest` naming
the argument, so a caller always learns which of its values was wrong.
"""

from typing import Any

from rapid_vmm import exception
from rapid_vmm import netutils
from rapid_vmm import objects
from rapid_vmm.virt import driver

#: Java ``long``: the legacy protocol and SQLite both stop here.
MAX_USER_ID = 2 ** 63 - 1
MAX_VCPUS = 1024
MAX_MEMORY_MB = 16 * 1024 * 1024
MAX_DISK_GB = 65536

AS_ACTIONS = ('suspend', 'remove')


def _invalid(reason: str) -> exception.InvalidRequest:
    return exception.InvalidRequest(reason=reason)


def integer(name: str, value: Any, minimum: int, maximum: int) -> int:
    """An ``int`` (not a bool, not a string) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f'{name} must be an integer, not '
                       f'{type(value).__name__} {value!r:.40}')
    if not minimum <= value <= maximum:
        raise _invalid(f'{name} must be between {minimum} and {maximum}, '
                       f'not {value}')
    return value


def user_id(value: Any) -> int:
    """A caller's user id: non-negative (negative ids are helpers')."""
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise _invalid(f'user_id {value} is reserved for helper VMs')
    return integer('user_id', value, 0, MAX_USER_ID)


def optional_user_id(value: Any) -> int | None:
    return None if value is None else user_id(value)


def os_type(value: Any) -> int:
    return integer('os_type', value, min(objects.OsType),
                   max(objects.OsType))


def vcpus(value: Any, allow_zero: bool = False) -> int:
    return integer('vcpus', value, 0 if allow_zero else 1, MAX_VCPUS)


def memory_mb(value: Any, allow_zero: bool = False) -> int:
    return integer('memory_mb', value, 0 if allow_zero else 1, MAX_MEMORY_MB)


def disk_gb(value: Any) -> int:
    return integer('disk_gb', value, 0, MAX_DISK_GB)


def gpu_cores(value: Any, total_cores: int) -> int:
    """0..``total_cores``, or any non-negative count when it is 0."""
    maximum = total_cores if total_cores > 0 else 2 ** 31 - 1
    return integer('gpu_cores', value, 0, maximum)


def resource(value: Any) -> str:
    if not isinstance(value, str) or value not in driver.USAGE_RESOURCES:
        raise _invalid(f'resource must be one of '
                       f'{", ".join(driver.USAGE_RESOURCES)}, not '
                       f'{value!r:.40}')
    return value


def as_action(value: Any) -> str:
    if not isinstance(value, str) or value not in AS_ACTIONS:
        raise _invalid(f'action must be one of {", ".join(AS_ACTIONS)}, not '
                       f'{value!r:.40}')
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f'{name} must be true or false, not {value!r:.40}')
    return value


def ip_address(value: Any) -> str:
    try:
        return netutils.parse_ip(value)
    except ValueError:
        raise _invalid(f'ip_address {value!r:.60} is not an IP '
                       'address') from None
