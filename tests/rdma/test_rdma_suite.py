"""Every RDMA test (``tests/rdma/guest/``) in one go: inside ONE soft-RoCE guest boot (``vm.py``),
or directly on a host whose ``ibv_devices`` lists a device. Where neither can run, this test
skips with one line saying why (``make test``), or fails (``make test-rdma``,
``MEMKV_RDMA_REQUIRED=1``).

``MEMKV_RDMA_MODE``: ``auto`` (default: direct when /sys/class/infiniband has a device, else the
guest), ``vm`` or ``direct``. ``MEMKV_RDMA_DEVICE`` / ``MEMKV_RDMA_GID_INDEX`` pick the device
and GID in direct mode. ``MEMKV_RDMA_PYTEST_ARGS`` adds arguments to the inner pytest (``-k ...``).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import vm

GUEST_DIR = Path(__file__).resolve().parent / "guest"
# The whole guest run; about a minute on two idle cores. MEMKV_RDMA_VM_TIMEOUT_S raises it for the
# heavy guest tests (MEMKV_RDMA_SLOW=1: lmcache and torch imports take minutes under emulation).
VM_TIMEOUT_S = int(os.environ.get("MEMKV_RDMA_VM_TIMEOUT_S", "600"))

pytestmark = [pytest.mark.rdma, pytest.mark.timeout(VM_TIMEOUT_S + 120)]


def host_devices() -> list[str]:
    """The host's verbs devices (what ``ibv_devices`` lists)."""
    try:
        return sorted(p.name for p in Path("/sys/class/infiniband").iterdir())
    except OSError:
        return []


def roce_v2_ipv4_gid(device: str, port: int = 1) -> tuple[int, str] | None:
    """(GID index, IPv4) of the first RoCE v2 GID mapping an IPv4 address, if the port has one."""
    base = Path(f"/sys/class/infiniband/{device}/ports/{port}")
    try:
        indexes = sorted(int(p.name) for p in (base / "gids").iterdir())
    except OSError:
        return None
    for i in indexes:
        try:
            kind = (base / "gid_attrs" / "types" / str(i)).read_text().strip()
            gid = ipaddress.IPv6Address((base / "gids" / str(i)).read_text().strip())
        except (OSError, ValueError):
            continue
        if kind == "RoCE v2" and gid.ipv4_mapped is not None:
            return i, str(gid.ipv4_mapped)
    return None


def inner_pytest() -> list[str]:
    # Plugin autoload off: importing hypothesis and anyio costs the guest ~25 s. A guest test
    # that needs a plugin: add "-p <plugin>" here.
    return [
        sys.executable, "-m", "pytest", "-v", "-p", "pytest_timeout", "-p", "no:cacheprovider",
        "--confcutdir", str(GUEST_DIR), "--durations=5", str(GUEST_DIR),
        *shlex.split(os.environ.get("MEMKV_RDMA_PYTEST_ARGS", "")),
    ]  # fmt: skip


def _unavailable(reason: str) -> None:
    if os.environ.get("MEMKV_RDMA_REQUIRED") == "1":
        pytest.fail(f"RDMA tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def test_rdma_guest_suite() -> None:
    mode = os.environ.get("MEMKV_RDMA_MODE", "auto")
    if mode not in ("auto", "vm", "direct"):
        pytest.fail(f"MEMKV_RDMA_MODE must be auto, vm or direct, not {mode!r}", pytrace=False)
    if importlib.util.find_spec("pyverbs") is None:
        _unavailable("pyverbs is not importable here (apt-get install python3-pyverbs; make venv-pyverbs)")
    env = dict(os.environ, MEMKV_RDMA_GUEST_TESTS="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    devices = host_devices()
    if mode == "direct" or (mode == "auto" and devices):
        if not devices:
            _unavailable("MEMKV_RDMA_MODE=direct but /sys/class/infiniband lists no device")
        device = env.setdefault("MEMKV_RDMA_DEVICE", devices[0])
        found = roce_v2_ipv4_gid(device)
        if found:
            env.setdefault("MEMKV_RDMA_GID_INDEX", str(found[0]))
            env.setdefault("MEMKV_RDMA_ADDR", found[1])
        env.setdefault("MEMKV_RDMA_GID_INDEX", "0")  # InfiniBand: the port GID
        print(f"RDMA tests directly on {device}, GID index {env['MEMKV_RDMA_GID_INDEX']}")
        cmd = inner_pytest()
    else:
        try:
            vm.build_assets(vm.check_host())
        except vm.GuestUnavailable as exc:
            _unavailable(f"no soft-RoCE guest: {exc}")
        venv = [] if sys.prefix == sys.base_prefix else ["--venv", sys.prefix]
        cmd = [sys.executable, vm.__file__, "-v", "--timeout", str(VM_TIMEOUT_S), *venv, "--", *inner_pytest()]
    # Output goes straight to the terminal under `make test-rdma` (-s); pytest shows it on failure.
    rc = subprocess.run(cmd, cwd=vm.REPO, env=env, stdin=subprocess.DEVNULL, timeout=VM_TIMEOUT_S + 60).returncode
    assert rc == 0, f"RDMA tests failed (exit {rc}); output above"
