"""Statistics helpers: the ops/s meter, hit ratio and the cluster total."""

from __future__ import annotations

import pytest

from lmcache_memkv.control.stats import RateMeter, hit_ratio, node_stats, stats_dict, total


def test_rate_meter_over_a_sliding_window() -> None:
    now = [0.0]
    meter = RateMeter(window_s=10.0, clock=lambda: now[0])
    assert meter.sample(0) == 0.0
    for t in range(1, 11):
        now[0] = float(t)
        rate = meter.sample(100 * t)
    assert rate == pytest.approx(100.0)
    for t in range(11, 31):  # traffic stops: the rate decays to zero once the window has passed
        now[0] = float(t)
        rate = meter.sample(1000)
    assert rate == 0.0


def test_node_stats_and_total() -> None:
    store = {"capacity_bytes": 100, "used_bytes": 40, "keys": 3, "hits": 3, "misses": 1, "evictions": 2, "leases": 1}
    a = node_stats(store, ops_total=10, ops_per_second=2.5)
    assert a.hit_ratio == 0.75 and a.ops_total == 10 and a.leases == 1
    b = node_stats({"capacity_bytes": 100, "hits": 0, "misses": 4}, ops_total=5, ops_per_second=0.5)
    t = total([a, b])
    assert (t.capacity_bytes, t.used_bytes, t.keys, t.evictions, t.ops_total) == (200, 40, 3, 2, 15)
    assert t.ops_per_second == 3.0 and t.hit_ratio == 3 / 8
    assert hit_ratio(0, 0) == 0.0
    d = stats_dict(t)
    assert d["capacity_bytes"] == 200 and "ops_per_second" in d and "no_space" in d
