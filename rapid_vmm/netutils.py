"""Small helpers about the host's network addresses."""

import ipaddress
import socket

import psutil


def first_non_loopback_ipv4() -> str:
    """Return the first non-loopback IPv4 address of the host.

    Interfaces are taken in name order so the answer is stable between runs.
    Falls back to ``127.0.0.1`` on a host with only loopback.
    """
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:
        return '127.0.0.1'
    for name in sorted(interfaces):
        for addr in interfaces[name]:
            if addr.family != socket.AF_INET:
                continue
            if ipaddress.ip_address(addr.address).is_loopback:
                continue
            return addr.address
    return '127.0.0.1'


def parse_ip(value: object) -> str:
    """Return ``value`` as a normalised IP address string.

    :raises ValueError: if ``value`` is not a string holding an IPv4 or IPv6
        address.
    """
    if not isinstance(value, str):
        raise ValueError('an IP address must be a string')
    return str(ipaddress.ip_address(value.strip()))
