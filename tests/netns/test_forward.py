"""Traffic a host forwards for its containers is rejected too: the owner match cannot see it.

Three namespaces: `host` routes between `container` (like a bridged Docker container) and `imds`,
which holds the IMDS addresses and serves HTTP on them. The rules are applied in `host` only.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns.conftest import IMDS, IMDS4, IMDS6, Netns, make_netns

pytestmark = pytest.mark.netns

BACKENDS = ["nftables", "iptables"]


class Topology:
    """container <-> host <-> imds, IPv4 and IPv6, with forwarding on in host."""

    def __init__(self) -> None:
        self.host = self.container = self.imds = None
        self.namespaces: list[Netns] = []

    def build(self) -> None:
        host, container, imds = (self._add(stem) for stem in ("fwh", "fwc", "fwi"))
        host.run(
            "ip", "link", "add", "h0", "type", "veth", "peer", "name", "c0", "netns", container.name
        )
        host.run(
            "ip", "link", "add", "h1", "type", "veth", "peer", "name", "i0", "netns", imds.name
        )
        # nodad: addresses usable at once rather than after duplicate address detection.
        for ns, dev, v4, v6 in (
            (host, "h0", "10.201.0.1/24", "fd01::1/64"),
            (container, "c0", "10.201.0.2/24", "fd01::2/64"),
            (host, "h1", "10.202.0.1/24", "fd02::1/64"),
            (imds, "i0", "10.202.0.2/24", "fd02::2/64"),
        ):
            ns.run("ip", "addr", "add", v4, "dev", dev)
            ns.run("ip", "-6", "addr", "add", v6, "dev", dev, "nodad")
            ns.run("ip", "link", "set", dev, "up")
        container.run("ip", "route", "add", "default", "via", "10.201.0.1")
        container.run("ip", "-6", "route", "add", "default", "via", "fd01::1")
        imds.run("ip", "route", "add", "default", "via", "10.202.0.1")
        imds.run("ip", "-6", "route", "add", "default", "via", "fd02::1")
        host.run("ip", "route", "add", f"{IMDS4}/32", "via", "10.202.0.2")
        host.run("ip", "-6", "route", "add", f"{IMDS6}/128", "via", "fd02::2")
        host.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        host.run("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        imds.run("ip", "addr", "add", f"{IMDS4}/32", "dev", "lo")
        imds.run("ip", "-6", "addr", "add", f"{IMDS6}/128", "dev", "lo", "nodad")
        imds.serve(f"{IMDS4}:80", f"[{IMDS6}]:80")
        self.host, self.container, self.imds = host, container, imds

    def _add(self, stem: str) -> Netns:
        ns = make_netns(stem)
        self.namespaces.append(ns)
        return ns

    def close(self) -> None:
        for ns in self.namespaces:
            ns.close()


@pytest.fixture
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        topo.build()
        yield topo
    finally:
        topo.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forwarded_container_traffic_is_rejected(topology: Topology, backend: str) -> None:
    host, container = topology.host, topology.container
    assert host is not None and container is not None
    for address in IMDS:
        attempt = container.connect(address)
        assert attempt.ok, f"the test network is broken: {address} unreachable before apply"

    applied = host.firewall("apply", "--backend", backend)
    assert applied.returncode == 0, applied.stderr

    for address in IMDS:
        # Root inside the container is no exception: forwarded packets have no local owner.
        attempt = container.connect(address)
        assert not attempt.ok
        assert attempt.error == "ECONNREFUSED", attempt
        assert attempt.elapsed < 1.0, attempt
        assert host.connect(address).ok, "root on the host itself must still reach IMDS"
    status = host.firewall("status", "--backend", backend)
    assert "forward ipv4 1, forward ipv6 1" in status.stdout

    assert host.firewall("remove", "--backend", backend).returncode == 0
    for address in IMDS:
        assert container.connect(address).ok
