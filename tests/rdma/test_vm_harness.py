"""The guest launcher's own pieces: initramfs and kernel building on synthetic inputs (no QEMU),
and QEMU never outliving the launcher (timeout, SIGTERM, SIGKILL: a few seconds each, no boot)."""

from __future__ import annotations

import io
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import vm


def _parse_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[pos : pos + size])
        pos += size + (-size % 4)


def test_cpio_round_trip() -> None:
    buf = io.BytesIO()
    c = vm.Cpio(buf)
    c.dir("bin")
    c.file("bin/x", b"abcde", 0o755)
    c.chardev("dev/console", 5, 1)
    c.finish()
    entries = _parse_cpio(buf.getvalue())
    assert entries["bin/x"] == (0o100755, b"abcde")
    assert entries["bin"][0] == 0o040755
    assert entries["dev/console"][0] == 0o020600


def test_strip_signature() -> None:
    body = b"\x7fELF module body"
    sig = b"S" * 37
    info = struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(sig))  # struct module_signature
    assert vm.strip_signature(body + sig + info + b"~Module signature appended~\n") == body
    assert vm.strip_signature(body) == body


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\nkernel/d-e.ko:\n"
    )
    assert vm.module_order(tmp_path, ["a", "d_e"]) == ["kernel/c.ko", "kernel/b.ko", "kernel/a.ko", "kernel/d-e.ko"]
    with pytest.raises(vm.GuestUnavailable, match="zz"):
        vm.module_order(tmp_path, ["zz"])


def test_extract_vmlinux_from_a_synthetic_bzimage() -> None:
    elf = b"\x7fELF" + os.urandom(1000)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    img = bytearray(2048)
    img[0x1F1] = 1  # setup_sects: protected-mode code starts at (1 + 1) * 512
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20F)
    struct.pack_into("<II", img, 0x248, 100, len(payload))
    img[1024 + 100 : 1024 + 100 + len(payload)] = payload
    assert vm.extract_vmlinux(bytes(img)) == elf


def test_command_script_and_env() -> None:
    env = vm.guest_env({"PATH": "/usr/bin", "A": "it's $HOME", "PWD": "/x", "bad-name": "1"}, Path("/v"))
    assert env["PATH"].startswith("/v/bin:/usr/bin")
    assert "PWD" not in env and "bad-name" not in env
    assert env["MEMKV_RDMA_DEVICE"] == vm.GUEST_DEVICE
    script = vm.command_script(["printf", "%s|", "a b", "$A"], Path("/"), {"A": "it's $HOME"})
    out = subprocess.run(["sh", "-c", script.replace("exec env -i", "exec env -i PATH=/usr/bin:/bin")],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out == "a b|$A|"


# ---------------------------------------------------------------- QEMU's lifetime


@pytest.fixture(scope="module")
def guest_ready() -> None:
    try:
        vm.build_assets(vm.check_host())
    except vm.GuestUnavailable as exc:
        pytest.skip(str(exc))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _qemu_child(parent: int, seconds: float = 30) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    stat = (p / "stat").read_text()
                except OSError:
                    continue
                comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
                if int(rest.split()[1]) == parent and comm.startswith("qemu-system"):
                    return int(p.name)
        time.sleep(0.1)
    raise AssertionError("no qemu child appeared")


@pytest.mark.rdma
def test_timeout_kills_qemu(guest_ready: None) -> None:
    res = vm.run(["sleep", "600"], timeout=3, stdout=io.BytesIO(), stderr=io.BytesIO())
    assert res.status == vm.EXIT_TIMEOUT
    assert "timed out" in res.reason
    assert _gone_within(res.qemu_pid, 5)


@pytest.mark.rdma
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_qemu_dies_with_the_launcher(guest_ready: None, sig: signal.Signals) -> None:
    launcher = subprocess.Popen(
        [sys.executable, vm.__file__, "--timeout", "600", "--", "sleep", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    qemu = 0
    shares: list[str] = []
    try:
        qemu = _qemu_child(launcher.pid)
        # A SIGKILLed launcher cannot remove its run directory: note it for the clean-up below.
        cmdline = Path(f"/proc/{qemu}/cmdline").read_bytes().decode(errors="replace")
        shares = re.findall(r"path=(/[^,\x00]*memkv-vm-[^,\x00]*)", cmdline)
        launcher.send_signal(sig)
        launcher.wait(timeout=30)
        assert _gone_within(qemu, 10), f"qemu {qemu} outlived the launcher ({sig.name})"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if qemu and _alive(qemu):
            os.kill(qemu, signal.SIGKILL)
        for share in shares:
            shutil.rmtree(share, ignore_errors=True)
