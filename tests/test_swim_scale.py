"""Sixteen real node processes: SWIM converges, finds a killed node DEAD and reaps it, within
bounds computed from the configuration (``swim.dead_bound_s``; docs/design.md states them).

Each bound has a scheduling allowance of ``SLACK_PERIODS`` protocol periods on top: sixteen
Python processes share a two-core CI box, so a period can run late.
"""

from __future__ import annotations

import time

from cluster_util import Views
from nodeproc import NodeFactory

from lmcache_memkv.control.swim import dead_bound_s

N = 16
HB = 0.2
SUSPECT_S = 0.6
DEAD_S = 1.2
REAP_S = 4.0
SLACK_PERIODS = 10
ARGS = [
    "--heartbeat-interval", str(HB), "--suspect-after", str(SUSPECT_S), "--dead-after", str(DEAD_S),
    "--reap-after", str(REAP_S), "--indirect-probes", "3",
]
# Every later joiner learns every earlier member from its seed's Join answer and pings each of
# them within its first pass (N - 1 periods, the ping answered within suspect-after); the
# earlier member learns the joiner from that ping, if gossip did not tell it first.
CONVERGE_BOUND_S = (N - 1) * HB + SUSPECT_S + SLACK_PERIODS * HB
DEAD_BOUND_S = dead_bound_s(N, HB, DEAD_S) + SLACK_PERIODS * HB
REAP_BOUND_S = DEAD_BOUND_S + REAP_S + HB  # reaped reap-after past its DEAD verdict, at a tick


def test_sixteen_nodes_converge_detect_a_kill_and_reap_it(node_factory: NodeFactory) -> None:
    nodes = []
    for i in range(N):
        args = ["--node-id", f"n{i:02d}", *ARGS]
        if nodes:
            args += ["--seed", str(nodes[0].control)]
        nodes.append(node_factory(capacity="4MiB", metrics=False, args=args))
    last_ready = time.monotonic()
    views = Views([str(n.control) for n in nodes])
    try:
        # 1. One view: every node lists all sixteen, ALIVE, with the same incarnations.
        while True:
            seen = views.all()
            first = next(iter(seen.values()))
            if first is not None and len(first) == N and all(v == first for v in seen.values()):
                if all(state == "ALIVE" for _, state in first.values()):
                    break
            took = time.monotonic() - last_ready
            assert took <= CONVERGE_BOUND_S, f"no single view within {CONVERGE_BOUND_S:.1f}s: {seen}"
            time.sleep(0.05)
        converged = time.monotonic() - last_ready
        print(f"16 nodes: one view {converged:.2f}s after the last was ready (bound {CONVERGE_BOUND_S:.1f}s)")

        # 2. SIGKILL one: DEAD in every survivor's view within the bound.
        victim = nodes[7]
        survivors = [str(n.control) for n in nodes if n is not victim]
        victim.kill()
        killed = time.monotonic()
        dead_at: dict[str, float] = {}
        while len(dead_at) < len(survivors):
            for endpoint in survivors:
                if endpoint in dead_at:
                    continue
                view = views.of(endpoint)
                if view is not None and view.get(victim.node_id, (0, ""))[1] == "DEAD":
                    dead_at[endpoint] = time.monotonic() - killed
            elapsed = time.monotonic() - killed
            assert elapsed <= DEAD_BOUND_S, f"not DEAD everywhere within {DEAD_BOUND_S:.1f}s: {sorted(dead_at.values())}"
            time.sleep(0.05)
        print(
            f"killed {victim.node_id}: first DEAD after {min(dead_at.values()):.2f}s, "
            f"DEAD everywhere after {max(dead_at.values()):.2f}s (bound {DEAD_BOUND_S:.1f}s)"
        )
        for endpoint, view in views.all().items():  # nobody else was hurt on the way
            if endpoint in survivors:
                assert view is not None and all(
                    state == "ALIVE" for node_id, (_, state) in view.items() if node_id != victim.node_id
                ), view

        # 3. Reaped: gone from every view, and it stays gone (no stale gossip brings it back).
        while True:
            seen = {e: views.of(e) for e in survivors}
            if all(v is not None and victim.node_id not in v for v in seen.values()):
                break
            elapsed = time.monotonic() - killed
            assert elapsed <= REAP_BOUND_S, f"{victim.node_id} still listed after {REAP_BOUND_S:.1f}s"
            time.sleep(0.1)
        reaped = time.monotonic() - killed
        print(f"{victim.node_id} gone from every view {reaped:.2f}s after the kill (bound {REAP_BOUND_S:.1f}s)")
        stay_until = time.monotonic() + 10 * HB
        while time.monotonic() < stay_until:
            for endpoint in survivors:
                view = views.of(endpoint)
                assert view is not None and victim.node_id not in view and len(view) == N - 1, view
            time.sleep(0.1)
    finally:
        views.close()
