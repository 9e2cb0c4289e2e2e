"""Several processes, one global mesh: jax.distributed set up from three settings, and the few places
where a program running in every process must act once.

Every process runs the same program on the same inputs; llama3_flax.sharding lays the params out on
a mesh over all processes' devices (jax.devices()), and each jit call is one SPMD program across them.
Host-side results (metrics, values written to a cache) are gathered to every process (`to_host`),
and only process 0 writes files (`is_writer`).
"""
from __future__ import annotations

import socket
import threading

import jax
import numpy as np


# How long the coordinator's host name may take to resolve before it is called unresolvable.
RESOLVE_TIMEOUT_SECONDS = 10.0


def check_coordinator_address(address: str | None, resolve_timeout: float = RESOLVE_TIMEOUT_SECONDS) -> str:
    """`address` ("host:port", "[v6 address]:port") once its port is an integer in 1..65535 and its host
    resolves (socket.getaddrinfo, given resolve_timeout seconds); else ValueError saying which.

    jax.distributed takes neither check: a port that is not a number crashes the process
    (SIGSEGV), and a host that does not resolve keeps every process waiting for minutes.
    """
    host, colon, port = (address or "").rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host:
        raise ValueError(f"coordinator_address must be host:port (e.g. host0:1234), got {address!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"coordinator_address {address!r}: the port {port!r} must be an integer in 1..65535")
    found: list = []

    def resolve():
        try:
            found.append(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM))
        except OSError as e:
            found.append(e)

    worker = threading.Thread(target=resolve, daemon=True)  # getaddrinfo itself has no timeout
    worker.start()
    worker.join(resolve_timeout)
    if not found:
        raise ValueError(f"coordinator_address {address!r}: the host {host!r} did not resolve within "
                         f"{resolve_timeout:g} s; give process 0's host name or IP address")
    if isinstance(found[0], OSError):
        raise ValueError(f"coordinator_address {address!r}: the host {host!r} does not resolve ({found[0]}); give "
                         "process 0's host name or IP address")
    return address


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               heartbeat_timeout_seconds: int = 60) -> None:
    """jax.distributed.initialize for num_processes > 1 (nothing for one process), before any JAX
    computation. On CPU the collectives go over gloo (TCP), so processes on one host or on several
    hosts without accelerators form one mesh too.

    heartbeat_timeout_seconds: a process that stops answering for this long (it died) makes the
    others fail with an error naming the missing task, instead of waiting in a collective forever.
    Bad settings (check_coordinator_address) raise ValueError before jax.distributed starts.
    """
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} must be in 0..{num_processes - 1} (num_processes {num_processes})")
    if num_processes == 1:
        return
    coordinator_address = check_coordinator_address(coordinator_address)
    if heartbeat_timeout_seconds < 1:
        raise ValueError(f"heartbeat_timeout_seconds must be >= 1, got {heartbeat_timeout_seconds}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def is_writer() -> bool:
    """Whether this process writes results files (process 0; the only process without jax.distributed)."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A NumPy copy of an array that may span several processes (gathered; every process gets it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def agree(name: str) -> None:
    """Waits until every process reaches this point (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
