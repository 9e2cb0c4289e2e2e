"""Coordinator settings are checked before jax.distributed starts: a port that is not a number used to
crash the process (SIGSEGV), and a host that does not resolve kept it waiting for minutes."""
import socket
import time

import jax
import pytest

from jaxedit import distributed


@pytest.fixture
def no_jax_distributed(monkeypatch):
    def refuse(**kwargs):
        raise AssertionError(f"jax.distributed started with {kwargs}")
    monkeypatch.setattr(jax.distributed, "initialize", refuse)


@pytest.mark.parametrize("address, match", [
    ("localhost:abc", r"the port 'abc' must be an integer in 1\.\.65535"),
    ("localhost:0", "the port '0' must be"),
    ("localhost:70000", "the port '70000' must be"),
    ("localhost:", "the port '' must be"),
    (":1234", "must be host:port"),
    ("localhost", "must be host:port"),
])
def test_bad_ports_and_addresses_are_refused_before_jax_distributed(no_jax_distributed, address, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(address, 2, 0)


def test_a_host_that_does_not_resolve_is_refused(no_jax_distributed, monkeypatch):
    def unknown(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(ValueError, match=r"the host 'hoost0' does not resolve \(.*Name or service not known"):
        distributed.initialize("hoost0:1234", 2, 1)


def test_a_host_that_takes_too_long_to_resolve_is_refused_in_time(no_jax_distributed, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(5))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"did not resolve within 0\.2 s"):
        distributed.check_coordinator_address("slowhost:1234", resolve_timeout=0.2)
    assert time.perf_counter() - start < 2


def test_good_addresses_pass(no_jax_distributed):
    assert distributed.check_coordinator_address("localhost:1234") == "localhost:1234"
    assert distributed.check_coordinator_address("127.0.0.1:65535") == "127.0.0.1:65535"
    assert distributed.check_coordinator_address("[::1]:1234") == "[::1]:1234"
    with pytest.raises(ValueError, match="heartbeat_timeout_seconds must be >= 1"):
        distributed.initialize("localhost:1234", 2, 0, heartbeat_timeout_seconds=0)
