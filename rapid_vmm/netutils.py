"""Small helpers about network addresses.

The host's own address (``[DEFAULT] my_ip``) comes from
:func:`oslo_utils.netutils.get_my_ipv4`: the source address of the default
route, not the first interface found.
"""

import ipaddress


def parse_ip(value: object) -> str:
    """Return ``value`` as a normalised IP address string.

    :raises ValueError: if ``value`` is not a string holding an IPv4 or IPv6
        address.
    """
    if not isinstance(value, str):
        raise ValueError('an IP address must be a string')
    return str(ipaddress.ip_address(value.strip()))
