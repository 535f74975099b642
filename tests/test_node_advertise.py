"""``--advertise-host``: what the cluster view tells peers and clients to dial."""

from __future__ import annotations

import subprocess

from nodeproc import NodeFactory, memkv_command, node_env

from lmcache_memkv.cluster import ClusterClient


def test_view_carries_the_advertised_host(node_factory: NodeFactory) -> None:
    node = node_factory(args=["--advertise-host", "localhost"])
    client = ClusterClient([node.control or ""], timeout_s=3.0)
    try:
        client.start()
        (member,) = client.members()
        assert member.data_endpoint == "localhost:" + node.data.rsplit(":", 1)[1]
        assert member.control_endpoint.startswith("localhost:")
        # And it is usable: the client dials the advertised name for data.
        assert client.put([b"k"], [b"value"]) == [True]
        buf = bytearray(5)
        assert client.get_into([b"k"], [buf]) == [5] and bytes(buf) == b"value"
    finally:
        client.close()


def test_advertise_host_with_a_port_is_refused() -> None:
    out = subprocess.run(
        [*memkv_command(), "node", "--listen", "127.0.0.1:0", "--advertise-host", "example.org:9900"],
        env=node_env(), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "--advertise-host takes a host without a port" in out.stderr
