"""Keeps benchmarks/sidecar_e2e.py from rotting: a tiny run through real lmcache servers, shape only.

memkv and ``resp`` (a real redis-server) always; ``mooncake_store`` is either measured or
skipped with a reason, whichever this machine allows. Nothing here looks at the speeds.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache_memkv.node.launcher import node_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sidecar_e2e.py"
_NUM = r"[\d,]+(?:\.\d+)?"
_CELL = rf"{_NUM}(?: \[{_NUM}-{_NUM}\])?"


def test_sidecar_benchmark_runs_tiny() -> None:
    args = ["--requests", "2", "--tokens", "512", "--repeat", "2"]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=node_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark stops its servers on SIGTERM
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    assert proc.returncode == 0, f"{out}\n{err}"

    mooncake_skipped = re.search(r"^mooncake_store: skipped \((.+)\)$", out, re.M)
    systems = ["L1 only", "memkv", "resp"] + ([] if mooncake_skipped else ["mooncake_store"])
    for name in systems:
        # store tok/s, store GB/s, store->L2 GB/s ("-" for L1 only), retrieve tok/s, retrieve GB/s, ratio
        row = rf"^{re.escape(name)}\s+{_CELL}\s+{_CELL}\s+(?:{_CELL}|-)\s+{_CELL}\s+{_CELL}\s+{_NUM}x$"
        assert re.search(row, out, re.M), out
        assert re.search(rf"^{re.escape(name)}\s+{_NUM}\s+{_NUM}\s+{_NUM}$", out, re.M), out  # per-request ms
    # 2 rounds x 2 requests x 2 chunks each: every chunk came from L2 and matched byte for byte.
    for name in systems[1:]:
        proof = rf"^  {name}: 8 chunks requested, LMCache L2 hits 8, L1 hits 0(?:, the L2's own reads \d+)?; written to L2 8; byte-exact 8/8$"
        assert re.search(proof, out, re.M), out
    assert re.search(
        r"^  L1 only: 8 chunks requested, LMCache L2 hits 0, L1 hits 8; written to L2 0; byte-exact 8/8$", out, re.M
    ), out
