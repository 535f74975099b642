"""Keeps the benchmarks (node_throughput, node_scale, gossip_traffic, peers) from rotting: runs them tiny and checks their reports.

It asserts nothing about speed: CI boxes are noisy, and the numbers belong in the README.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nodeproc import node_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "node_throughput.py"


def test_benchmark_runs_with_tiny_parameters() -> None:
    args = ["--value-size", "64KiB", "--batch", "4", "--batches", "2", "--rounds", "2", "--warmup", "1"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=node_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^put: [\d.]+ GB/s = \d+% of raw loopback \([\d.]+ GB/s\)$", out, re.M), out
    assert re.search(r"^get: [\d.]+ GB/s = \d+% of raw loopback \([\d.]+ GB/s\)$", out, re.M), out
    for row in ("raw TCP, client -> server", "raw TCP, server -> client", "PUT  client -> node", "GET  node -> client"):
        assert row in out
    assert re.search(r"^node CPU seconds per GB: PUT [\d.]+, GET [\d.]+ \(", out, re.M), out


GOSSIP = Path(__file__).resolve().parents[1] / "benchmarks" / "gossip_traffic.py"


def test_gossip_traffic_benchmark_runs_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(GOSSIP), "--quick"], env=node_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)$", proc.stdout, re.M)
    assert [int(r[0]) for r in rows] == [2, 4], proc.stdout
    assert all(int(r[1]) > 0 and int(r[2]) > 0 for r in rows), proc.stdout  # the counter moves both ways
    assert re.search(r"^max/min ratio: [\d.]+ \(goal: within 2x\)$", proc.stdout, re.M), proc.stdout


SCALE = SCRIPT.with_name("node_scale.py")


def test_scale_benchmark_runs_in_quick_mode() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCALE), "--quick"], env=node_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for n in (1, 4):
        assert re.search(rf"^put@{n}: [\d.]+ GB/s = \d+% of raw loopback \([\d.]+ GB/s\)$", out, re.M), out
        assert re.search(rf"^get@{n}: [\d.]+ GB/s = \d+% of raw loopback \([\d.]+ GB/s\)$", out, re.M), out
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+[\d.]+ [KMG]iB$", out, re.M)
    assert [int(conns) for conns, _ in rows] == [0, 200], out


PEERS = SCRIPT.with_name("peers.py")
_NUM = r"\d+(?:\.\d+)?"
_CELL = rf"{_NUM} \[{_NUM}-{_NUM}\]"  # median [min-max]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (the resp peer)")
def test_peers_benchmark_runs_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(PEERS), "--quick"], env=node_env(), capture_output=True, text=True, timeout=240
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-5000:] + out
    mooncake = not re.search(r"^mooncake_store: skipped \(.+\)$", out, re.M)
    systems = ["memkv", "resp", "fs_native"] + (["mooncake_store"] if mooncake else [])
    rows = {r[0]: r[1:] for r in (re.split(r"\s{2,}", ln.strip()) for ln in out.splitlines()) if r}
    assert rows["metric @ in_flight"] == [*systems, "memkv/best_peer", "memkv/mooncake"], out
    for metric in ("store GB/s", "load GB/s", "lookup keys/s"):
        for in_flight in (1, 4):
            cells = rows[f"{metric} @ {in_flight}"]
            assert len(cells) == len(systems) + 2, out
            assert all(re.fullmatch(_CELL, c) for c in cells[: len(systems)]), out
            assert re.fullmatch(rf"{_NUM}x \((resp|mooncake_store)\)", cells[-2]), out
            assert re.fullmatch(rf"{_NUM}x" if mooncake else "-", cells[-1]), out
    for ref in ("raw TCP 1 stream GB/s", "raw TCP 4 streams GB/s", "memcpy GB/s"):
        assert re.fullmatch(_CELL, rows[ref][0]), out
    for streams in (1, 4):
        assert re.fullmatch(r"\d+%", rows[f"memkv load / raw TCP @ {streams}"][0]), out
    sides = [("memkv", "memkv_node"), ("resp", "redis_server"), ("fs_native", "none")]
    if mooncake:  # where benchmarks/mooncake_setup.sh has been run
        sides.append(("mooncake_store", "mooncake_master + mooncake_client"))
    for system, store_side in sides:
        assert f"-- {system} (store side: {store_side}; " in out, out
    # Each system's CPU table has its own columns; ``rows`` keeps the last system's header.
    cpu_columns = (
        ["memkv_node", "bench"], ["redis_server", "bench"], ["bench"],
        ["mooncake_master", "mooncake_client", "store_total", "bench"],
    )  # fmt: skip
    assert rows["value @ in_flight"] in cpu_columns, out
    cpu_rows = [r for k, r in rows.items() if re.fullmatch(r"64\.0 KiB @ [14]", k)]
    assert cpu_rows and all(re.fullmatch(_CELL, c) for r in cpu_rows for c in r), out
    assert "bench OMP_NUM_THREADS=1" in out.splitlines()[0], out  # the harness's torch runs one thread
    assert re.search(r"^runs: \d+, every key verified: yes$", out, re.M), out
    assert re.search(r"^wall time: \d+ s$", out, re.M), out
