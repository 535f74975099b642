"""Keeps benchmarks/node_throughput.py and node_scale.py from rotting: runs them tiny and checks their reports.

It asserts nothing about speed: CI boxes are noisy, and the numbers belong in the README.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
