"""Network addresses a run waits on (a Ray cluster, an experiment tracker's server): each is probed with a
bounded wait before the library that uses it starts, so that nothing listening there is one line after at most
`CONNECT_TIMEOUT_S`, not a library's retries without end."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from dfs_merge.errors import DfsMergeError

CONNECT_TIMEOUT_S = 10.0
"""How long a TCP connection to a cluster or a server is waited for."""
DEFAULT_PORTS = {"http": 80, "https": 443, "ray": 10001}


def endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `scheme://host[:port][/path]` (http, https and ray:// have default ports);
    None when the text names no TCP endpoint (a file path, `file:` URI, a scheme of no known port)."""
    try:
        if "://" in address:
            parts = urlsplit(address)
            port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
            return (parts.hostname, port) if parts.hostname and port else None
        host, sep, port_text = address.rpartition(":")
        if sep and host and port_text.isdigit() and 0 < int(port_text) < 65536:
            return host.strip("[]"), int(port_text)
    except ValueError:  # a port that is not a number
        return None
    return None


def check_reachable(address: str, what: str, error: type[DfsMergeError] = DfsMergeError,
                    timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise `error` with one line when nothing accepts a TCP connection at `address`'s endpoint within
    `timeout` seconds (an address that names no endpoint is not probed)."""
    found = endpoint(address)
    if found is None:
        return
    host, port = found
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except TimeoutError:
        raise error(f"{what}: nothing answered at {host}:{port} within {timeout:g} s") from None
    except OSError as err:  # refused, unreachable, a name that does not resolve
        raise error(f"{what}: cannot reach {host}:{port} ({err.strerror or err})") from None
