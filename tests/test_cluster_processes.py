"""Three real ``memkv node`` processes on loopback: membership, failure detection, fail-over, status.

Failure detection runs with --heartbeat-interval 0.2 --suspect-after 0.6 --dead-after 1.2;
every bound below is stated in those heartbeat intervals (HB). Each test prints what it measured.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from cluster_util import DEAD_S, FAST_ARGS, HEARTBEAT_S, member_list, wait_until
from nodeproc import NodeProcess, memkv_command, node_env

from lmcache_memkv.cluster import ClusterClient

NodeFactory = Callable[..., NodeProcess]
KEY = bytes(range(7, 39))
ENV = {"MEMKV_AUTH_KEY": KEY.hex()}
HB = HEARTBEAT_S
CONVERGE_BOUND_S = 10 * HB  # from the last node's ready line to identical views everywhere
DEAD_BOUND_S = DEAD_S + 5 * HB  # from kill -9 to DEAD on every survivor
LEFT_BOUND_S = 5 * HB  # from SIGTERM to LEFT: the goodbye is sent, not detected
CLIENT_TIMEOUT_S = 1.0
CALL_SLACK_S = 0.3  # scheduling on a loaded two-core box, on top of the client's own bound


def start_cluster(node_factory: NodeFactory, names: tuple[str, ...] = ("n1", "n2", "n3")) -> list[NodeProcess]:
    nodes: list[NodeProcess] = []
    for name in names:
        args = ["--node-id", name, *FAST_ARGS]
        if nodes:
            args += ["--seed", str(nodes[0].control)]
        nodes.append(node_factory(capacity="16MiB", metrics=False, args=args, env=ENV))
    return nodes


def view_of(node: NodeProcess) -> tuple[int, dict[str, tuple[int, str]]]:
    epoch, members = member_list(str(node.control), KEY)
    return epoch, {m.node_id: (m.incarnation, str(m.state)) for m in members}


def state_on(node: NodeProcess, node_id: str) -> str | None:
    return view_of(node)[1].get(node_id, (0, None))[1]


def memkv_status(*args: str, servers: str | None = None) -> subprocess.CompletedProcess[str]:
    env = node_env(ENV)
    if servers is not None:
        env["MEMKV_SERVERS"] = servers
    return subprocess.run([*memkv_command(), "status", *args], env=env, capture_output=True, text=True, timeout=30)


def test_ready_line_reports_bound_endpoints(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="8MiB", metrics=False, args=["--node-id", "solo", *FAST_ARGS], env=ENV)
    assert node.node_id == "solo"
    assert node.control and not node.control.endswith(":0") and not node.data.endswith(":0")
    _, members = member_list(node.control, KEY)
    assert [(m.node_id, m.data_endpoint, m.control_endpoint) for m in members] == [("solo", node.data, node.control)]


def test_membership_lifecycle(node_factory: NodeFactory) -> None:
    n1, n2, n3 = start_cluster(node_factory)

    def converged() -> bool:
        views = [view_of(n) for n in (n1, n2, n3)]
        want = {"n1", "n2", "n3"}
        return (
            all(v[1] == views[0][1] and set(v[1]) == want for v in views)
            and all(s == "ALIVE" for _, s in views[0][1].values())
            and len({v[0] for v in views}) == 1
        )

    _, took = wait_until("the three views converge (members, states and epoch)", converged, CONVERGE_BOUND_S)
    print(f"\nconvergence: {took:.2f}s after the last node was ready (bound {CONVERGE_BOUND_S:.1f}s = 10 HB)")

    # memkv status sees all three, as a table and as JSON, from --servers or MEMKV_SERVERS.
    table = memkv_status("--servers", str(n2.control))
    assert table.returncode == 0, table.stderr
    for n in (n1, n2, n3):
        assert n.node_id in table.stdout and str(n.control) in table.stdout and n.data in table.stdout
    assert "3 of 3 members up" in table.stdout and "ALIVE" in table.stdout
    assert "transports" in table.stdout and table.stdout.count("tcp") >= 3  # no RDMA device on these nodes
    doc = json.loads(memkv_status("--json", servers=f"127.0.0.1:1,{n1.control}").stdout)
    assert {m["node_id"]: m["state"] for m in doc["members"]} == {"n1": "ALIVE", "n2": "ALIVE", "n3": "ALIVE"}
    assert doc["epoch"] >= 1 and all(m["capacity_bytes"] == 16 << 20 for m in doc["members"])
    old_incarnation = view_of(n1)[1]["n3"][0]

    # kill -9: DEAD everywhere within the bound, through SUSPECT.
    killed_at = time.monotonic()
    n3.kill()
    wait_until("n3 DEAD on n1 and n2", lambda: state_on(n1, "n3") == state_on(n2, "n3") == "DEAD", DEAD_BOUND_S)
    dead_took = time.monotonic() - killed_at
    print(f"dead detection: {dead_took:.2f}s after kill -9 (dead-after {DEAD_S}s, bound {DEAD_BOUND_S:.1f}s)")
    out = memkv_status("--json", "--servers", str(n1.control))
    assert {m["node_id"]: m["state"] for m in json.loads(out.stdout)["members"]}["n3"] == "DEAD"
    table = memkv_status("--servers", str(n1.control))
    assert "DEAD" in table.stdout and "2 of 3 members up" in table.stdout

    # SIGTERM: a graceful leave shows LEFT (not DEAD), quickly.
    termed_at = time.monotonic()
    n2.signal(signal.SIGTERM)
    wait_until("n2 LEFT on n1", lambda: state_on(n1, "n2") == "LEFT", LEFT_BOUND_S)
    print(f"leave: n1 saw LEFT {time.monotonic() - termed_at:.2f}s after SIGTERM (bound {LEFT_BOUND_S:.1f}s)")
    assert n2.wait(10) == 0

    # Restart n3 with the same id and the same ports: it rejoins with a higher incarnation.
    again = node_factory(
        capacity="16MiB",
        metrics=False,
        args=[
            "--node-id",
            "n3",
            *FAST_ARGS,
            "--seed",
            str(n1.control),
            "--listen",
            n3.data,
            "--control-listen",
            str(n3.control),
        ],
        env=ENV,
    )
    assert again.data == n3.data and again.control == n3.control
    (new_inc, _), took = wait_until(
        "n3 ALIVE again on n1",
        lambda: (v := view_of(n1)[1]["n3"])[1] == "ALIVE" and v,
        CONVERGE_BOUND_S,
    )
    print(f"rejoin: n3 ALIVE on n1 {took:.2f}s after its ready line; incarnation {old_incarnation} -> {new_inc}")
    assert new_inc > old_incarnation
    assert view_of(again)[1]["n2"][1] == "LEFT"  # the rejoined node learnt the history too


def _read_all(client: ClusterClient, keys: list[bytes], values: dict[bytes, bytes], batch: int) -> list[float]:
    """Read every key in batches; assert each value is intact; the duration of each call."""
    times = []
    for i in range(0, len(keys), batch):
        part = keys[i : i + batch]
        buffers = [bytearray(len(values[k])) for k in part]
        started = time.monotonic()
        lengths = client.get_into(part, buffers)
        times.append(time.monotonic() - started)
        for k, n, buf in zip(part, lengths, buffers):
            assert n == len(values[k]) and bytes(buf) == values[k], f"key {k!r} unreadable"
    return times


@pytest.fixture
def replicated(node_factory: NodeFactory) -> Iterator[tuple[ClusterClient, list[NodeProcess], dict[bytes, bytes]]]:
    """Three nodes, a client with R=2, and 240 acknowledged keys."""
    nodes = start_cluster(node_factory)
    client = ClusterClient([str(nodes[0].control)], key=KEY, replicas=2, timeout_s=CLIENT_TIMEOUT_S)
    try:
        client.start()
        wait_until("client sees three ALIVE members", lambda: len(client.placement(b"x")) == 3, CONVERGE_BOUND_S)
        keys = [f"chunk-{i:04d}".encode() for i in range(240)]
        values = {k: bytes([i % 256]) * (512 + i) for i, k in enumerate(keys)}
        assert client.put(keys, [values[k] for k in keys]) == [True] * len(keys)  # every key acknowledged
        yield client, nodes, values
    finally:
        client.close()


def _fail_and_read(
    client: ClusterClient,
    nodes: list[NodeProcess],
    values: dict[bytes, bytes],
    fail: Callable[[NodeProcess], None],
    how: str,
) -> NodeProcess:
    """Fail the node whose view stream the client follows (the harder case: the watch must move
    too); read every key again and again until the client's view shows it DEAD."""
    watched = client.health()["watching"]
    victim = next(n for n in nodes if n.control == watched)
    keys = sorted(values)
    assert sum(victim.node_id in client.placement(k)[:2] for k in keys) > 100  # it holds many replicas
    fail(victim)
    failed_at = time.monotonic()
    in_view: list[float] = []
    after: list[float] = []
    puts: list[float] = []
    unacked = 0
    while True:
        state = {m.node_id: str(m.state) for m in client.members()}[victim.node_id]
        times = _read_all(client, keys, values, batch=24)
        (in_view if state in ("ALIVE", "SUSPECT") else after).extend(times)
        key = f"during-{len(puts)}".encode()
        on_victim = victim.node_id in client.placement(key)[:2]
        started = time.monotonic()
        ok = client.put([key], [b"v"]) == [True]
        puts.append(time.monotonic() - started)
        # Until the cluster declares it DEAD, a write placed on the failed node cannot be
        # acknowledged (that replica neither stored it nor dropped the old value); others are.
        assert ok or on_victim, f"{key!r} does not involve the failed node, yet was not acknowledged"
        unacked += 0 if ok else 1
        if state == "DEAD" and after:
            break
        assert time.monotonic() - failed_at < 15, "the client never saw the victim DEAD"
    print(
        f"\n{how} of the watched node: {len(in_view)} get_into calls (24 keys) while it was still ALIVE/SUSPECT "
        f"in the view: max {max(in_view) * 1000:.0f}ms, median {sorted(in_view)[len(in_view) // 2] * 1000:.1f}ms; "
        f"{len(after)} after DEAD: max {max(after) * 1000:.0f}ms; puts max {max(puts) * 1000:.0f}ms "
        f"({unacked} of {len(puts)} unacknowledged while it was in placement) "
        f"(timeout {CLIENT_TIMEOUT_S}s); the client's view showed DEAD after {time.monotonic() - failed_at:.2f}s"
    )
    assert in_view, "no call was made while the failed node was still in the view"
    assert max(in_view + after + puts) <= CLIENT_TIMEOUT_S + CALL_SLACK_S
    return victim


def test_replicas_keep_every_acknowledged_key_after_kill(
    replicated: tuple[ClusterClient, list[NodeProcess], dict[bytes, bytes]],
) -> None:
    _fail_and_read(*replicated, lambda n: n.kill(), "kill -9")


def test_frozen_node_costs_at_most_the_timeout_and_refutes_when_it_wakes(
    replicated: tuple[ClusterClient, list[NodeProcess], dict[bytes, bytes]],
) -> None:
    """SIGSTOP: connections hang instead of being refused (the harder case for the timeout), and
    the view stream goes silent instead of breaking (the watcher must notice on its own)."""
    client, nodes, values = replicated
    victim = _fail_and_read(client, nodes, values, lambda n: n.signal(signal.SIGSTOP), "SIGSTOP")
    dead_inc = {m.node_id: m.incarnation for m in client.members()}[victim.node_id]
    victim.signal(signal.SIGCONT)
    m, took = wait_until(
        "the woken node refutes DEAD with a higher incarnation",
        lambda: next((m for m in client.members() if m.node_id == victim.node_id and m.state == "ALIVE"), None),
        CONVERGE_BOUND_S,
    )
    print(f"woken node ALIVE again in the client's view after {took:.2f}s, incarnation +{m.incarnation - dead_inc}")
    assert m.incarnation > dead_inc
    # It did not accuse its peers for its own pause: everyone ends up ALIVE, every key readable.
    wait_until("all ALIVE", lambda: all(x.state == "ALIVE" for x in client.members()), CONVERGE_BOUND_S)
    _read_all(client, sorted(values), values, batch=60)


@pytest.mark.parametrize("servers", ["127.0.0.1:1"])
def test_status_fails_clearly_without_a_cluster(servers: str) -> None:
    out = memkv_status("--servers", servers, "--timeout", "1")
    assert out.returncode == 1
    assert servers in out.stderr and "MEMKV_SERVERS" in out.stderr
    out = memkv_status()
    assert out.returncode == 2 and "MEMKV_SERVERS" in out.stderr
