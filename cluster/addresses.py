"""Which addresses stay on this machine."""
from __future__ import annotations

import ipaddress

LOOPBACK = "127.0.0.1"  # where a process listens that only this machine may reach


def is_loopback(host: str) -> bool:
    """localhost or a loopback IP (brackets allowed, as in URLs); a host name may resolve anywhere: False."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
