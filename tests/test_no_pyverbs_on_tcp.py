"""pyverbs is imported only on the RDMA path: importing any lmcache_memkv module and choosing the
TCP transport must leave it unloaded (a TCP-only host may have a broken or mismatched pyverbs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

PROBE = """
import importlib, pkgutil, sys
import lmcache_memkv
for m in pkgutil.walk_packages(lmcache_memkv.__path__, "lmcache_memkv."):
    if ".proto.memkv" not in m.name:
        importlib.import_module(m.name)
from lmcache_memkv.adapter.memkv_l2_adapter import _choose_transport
from lmcache_memkv.adapter.metrics import get_metrics
from lmcache_memkv.adapter.settings import resolve
assert _choose_transport(resolve({"servers": "h:1", "transport": "tcp"}, env={}), None, get_metrics())[0] == "tcp"
print("\\n".join(sorted(n for n in sys.modules if n.split(".")[0] == "pyverbs")))
"""


def test_importing_everything_and_choosing_tcp_leaves_pyverbs_alone() -> None:
    if importlib.util.find_spec("pyverbs") is None:
        pytest.skip("pyverbs is not installed here, so nothing could import it")
    if importlib.util.find_spec("lmcache") is None:
        pytest.skip("lmcache not installed (the adapter module needs it)")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"pyverbs modules loaded on the TCP path: {out.stdout.split()}"
