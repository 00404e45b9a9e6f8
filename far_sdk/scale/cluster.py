"""Joining a Ray cluster without hanging: ``ray.init(address=HOST:PORT)`` retries an unreachable address for
minutes, printing a warning every few seconds, so an address is first checked with one plain TCP connect."""

from __future__ import annotations

import socket
from typing import Any

from far_sdk.errors import BackendUnavailableError, InvalidArgumentError

#: Seconds the TCP check waits for the cluster's head (GCS) port.
CONNECT_TIMEOUT_S = 5.0


def head_endpoint(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of an explicit cluster address ("HOST:PORT" or "ray://HOST:PORT"); None for "auto" and
    "local", which Ray resolves itself (quickly)."""
    if address in ("auto", "local"):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(
            f"--address {address!r} is not a Ray cluster address: give HOST:PORT (the head's GCS port, e.g. "
            "10.0.0.5:6379), ray://HOST:10001 (Ray Client), or 'auto' for the cluster on this machine"
        )
    return host.strip("[]"), int(port)


def init_ray(ray: Any, address: str | None, **kwargs: Any) -> None:
    """``ray.init(address=address, **kwargs)``, refusing an unreachable address within :data:`CONNECT_TIMEOUT_S`
    with a :class:`BackendUnavailableError` instead of Ray's minutes of retries; None starts a local Ray."""
    endpoint = None if address is None else head_endpoint(address)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise BackendUnavailableError(
                f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__}): start it there "
                "(ray start --head), check the address and firewall, or leave out --address to run on a local Ray"
            ) from e
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:  # "auto" with no cluster running, or the head went away
        raise BackendUnavailableError(
            f"could not join the Ray cluster at {address}: {e}; start one (ray start --head) or leave out --address"
        ) from e
