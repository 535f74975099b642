"""Run one command inside a throwaway QEMU guest that has a soft-RoCE device (``rxe0``).

Usage::

    python tests/rdma/vm.py [options] -- <command> [args...]

The guest boots Debian's own kernel (``linux-image-amd64`` ships ``rdma_rxe``) through PVH, from
an ELF vmlinux extracted here from the installed bzImage, with a small initramfs built here
(busybox-static plus the virtio, 9p, overlay, dummy and RDMA modules). The initramfs mounts the
host's ``/`` read-only over 9p with a tmpfs overlay on top and ``switch_root``s into it, so the
guest sees the host's Python, the project's venv and the checkout at the same paths. It then
creates the dummy netdev ``rdma0`` (192.0.2.1/24, TEST-NET-1: nothing leaves the guest, which
has no NIC) and ``rxe0`` on it, runs the command in the caller's cwd with the caller's
environment (plus the project's venv and ``MEMKV_RDMA_*``), streams its stdout/stderr back over
virtio-serial, writes its exit status into a 9p-shared run directory and powers off.

QEMU runs under TCG (software emulation) unless /dev/kvm is backed by kvm_intel/kvm_amd, so the
same harness runs on any x86-64 Linux host with the packages (see ``.ci/run``). Kernel and
initramfs are cached under ``$MEMKV_VM_CACHE`` (default ``~/.cache/memkv-rdma-guest/``), keyed by
kernel version and the content of this file's guest scripts; a missing cache is rebuilt.

Debugging: ``--console`` copies the guest console to stderr; ``MEMKV_VM_APPEND`` replaces the
kernel command line (drop ``quiet`` to see the kernel boot); ``MEMKV_VM_ACCEL=tcg|kvm``.

Exit status: the command's own; 124 when ``--timeout`` expired; 125 when the guest could not
run the command (the reason and the console's tail go to stderr). QEMU dies with the launcher
(PR_SET_PDEATHSIG), on SIGTERM/SIGINT and on timeout.
"""

from __future__ import annotations

import argparse
import bz2
import ctypes
import gzip
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[2]

# What guest tests read (tests/rdma/guest/conftest.py); fixed inside the guest.
GUEST_DEVICE = "rxe0"
GUEST_NETDEV = "rdma0"
GUEST_ADDR = "192.0.2.1/24"  # TEST-NET-1, on a dummy netdev inside the guest only
GUEST_GID_INDEX = 1  # RoCE v2 ::ffff:192.0.2.1; index 0 is the link-local GID

EXIT_TIMEOUT = 124
EXIT_NO_GUEST = 125

# Modules the guest loads, dependencies resolved from modules.dep. Everything else the guest
# needs (devtmpfs, tmpfs, serial console, ACPI power-off) is built into Debian's kernel.
MODULES = (
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
    "configfs",
    "dummy",
    "rdma_rxe",
    "rdma_ucm",
)

# Stage 1: PID 1 in the initramfs. Builds the root (host / over 9p, read-only, with a tmpfs
# overlay so the tree looks writable) and hands over to stage 2 inside it.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "memkv-vm: FAILED: $*"; poweroff -f; sleep 5; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/lib/modules/$m" || fail "insmod $m"; done < /modules.order
mkdir -p /lower /rw /newroot
# cache=loose: the guest never writes through this mount, and metadata caching is most of the
# speed of Python imports over 9p under emulation.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower || fail "9p mount of the host's /"
mount -t tmpfs -o mode=0755 rw /rw
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "overlay"
for d in proc sys dev; do mount --move /$d /newroot/$d; done
# The host's /run is its own business: the guest gets an empty one. /tmp stays the host's, seen
# through the overlay (the guest's writes land in its tmpfs), since a checkout or venv may live
# there: CI clones under /tmp.
mount -t tmpfs -o mode=0755 run /newroot/run
mkdir -p /newroot/run/memkv-vm/share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 runshare /newroot/run/memkv-vm/share || fail "9p mount of the run directory"
cp /bin/busybox /stage2 /newroot/run/memkv-vm/
exec switch_root /newroot /run/memkv-vm/busybox sh /run/memkv-vm/stage2
"""

# Stage 2: PID 1 in the host's tree. Creates the soft-RoCE device, runs the command, reports.
STAGE2 = r"""
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
B=/run/memkv-vm/busybox
S=/run/memkv-vm/share
fail() { echo "memkv-vm: FAILED: $*"; echo "$*" > $S/setup-error; $B sync; $B poweroff -f; $B sleep 5; }
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
$B ln -sf pts/ptmx /dev/ptmx
$B mount -t tmpfs -o mode=1777 shm /dev/shm
$B mount -t configfs configfs /sys/kernel/config
$B hostname memkv-rdma-vm
ip link set lo up || fail "lo up"
ip link add @NETDEV@ type dummy || fail "dummy netdev"
ip addr add @ADDR@ dev @NETDEV@ || fail "address"
ip link set @NETDEV@ up || fail "netdev up"
rdma link add @DEVICE@ type rxe netdev @NETDEV@ || fail "rdma link add @DEVICE@"
i=0
while [ ! -e /dev/infiniband/uverbs0 ]; do
  i=$((i + 1)); [ $i -gt 300 ] && fail "no /dev/infiniband/uverbs0 after 30 s"
  $B sleep 0.1
done
out=; err=
for p in /sys/class/virtio-ports/*; do
  case "$($B cat $p/name)" in
    memkv.stdout) out=/dev/${p##*/} ;;
    memkv.stderr) err=/dev/${p##*/} ;;
  esac
done
[ -n "$out" ] && [ -n "$err" ] || fail "virtio-serial ports not found"
ulimit -l unlimited
echo "memkv-vm: ready"
/bin/sh $S/command.sh < /dev/null > $out 2> $err
echo $? > $S/status.tmp && $B mv $S/status.tmp $S/status
$B sync
$B poweroff -f
$B sleep 5
"""


class GuestUnavailable(Exception):
    """The guest cannot start on this host; ``str()`` is the one-line reason."""


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    moddir: Path


@dataclass(frozen=True)
class Assets:
    kernel: Path  # ELF vmlinux (PVH entry point)
    initrd: Path  # uncompressed newc cpio
    version: str


# ---------------------------------------------------------------- what the host has


def _version_key(v: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", v) if p]


def find_kernel() -> Kernel:
    """The newest installed kernel whose modules include rdma_rxe (``MEMKV_VM_KERNEL`` picks one)."""
    wanted = os.environ.get("MEMKV_VM_KERNEL")
    found: list[Kernel] = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if wanted and version != wanted:
            continue
        moddir = Path("/lib/modules") / version
        try:
            dep = (moddir / "modules.dep").read_text()
        except OSError:
            continue
        if "/rdma_rxe.ko" in dep and os.access(vmlinuz, os.R_OK):
            found.append(Kernel(version, vmlinuz, moddir))
    if not found:
        which = f"kernel {wanted}" if wanted else "a kernel"
        raise GuestUnavailable(f"no {which} with rdma_rxe in /boot + /lib/modules (install linux-image-amd64)")
    return max(found, key=lambda k: _version_key(k.version))


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (the initramfs has no libc)."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def qemu_binary() -> str:
    qemu = os.environ.get("MEMKV_VM_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    if not os.access(qemu, os.X_OK):
        raise GuestUnavailable(f"{qemu} not found (install qemu-system-x86)")
    return qemu


def busybox_binary() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.exists() and _is_static_elf(p):
            return p
    raise GuestUnavailable("no static busybox (install busybox-static)")


def check_host() -> Kernel:
    """Everything the guest needs from the host, or :class:`GuestUnavailable` naming the first gap."""
    if os.uname().machine != "x86_64":
        raise GuestUnavailable(f"the guest is x86-64 only (this host is {os.uname().machine})")
    qemu_binary()
    busybox_binary()
    for tool, pkg in (("ip", "iproute2"), ("rdma", "iproute2"), ("ibv_devices", "ibverbs-utils")):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            raise GuestUnavailable(f"{tool} not found (install {pkg})")
    libdirs = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64")
    if not any(any(Path(d).glob("libibverbs/librxe-rdmav*.so")) for d in libdirs):
        raise GuestUnavailable("the rxe verbs provider is missing (install ibverbs-providers)")
    return find_kernel()


# ---------------------------------------------------------------- building kernel + initramfs


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage: QEMU's PVH boot wants the ELF, the bzImage path would run
    the real-mode decompressor, which is slow under emulation."""
    if bzimage[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        raise GuestUnavailable("kernel image is not a bzImage with boot protocol >= 2.08")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)  # payload_offset, payload_length
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    elif payload.startswith(b"\x5d\x00\x00"):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    elif payload.startswith(b"BZh"):
        elf = bz2.BZ2Decompressor().decompress(payload)
    elif payload.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
        elf = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True, check=True).stdout
    else:
        raise GuestUnavailable(f"unsupported kernel compression (payload starts {payload[:6].hex()})")
    if not elf.startswith(b"\x7fELF"):
        raise GuestUnavailable("decompressed kernel is not an ELF image")
    return elf


_SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(ko: bytes) -> bytes:
    """The module without its appended signature: the kernel does not enforce signatures, and
    checking them is seconds of RSA under emulation."""
    if not ko.endswith(_SIG_MAGIC):
        return ko
    # struct module_signature (12 bytes, sig_len big-endian at its end) precedes the magic.
    sig_len, = struct.unpack_from(">I", ko, len(ko) - len(_SIG_MAGIC) - 4)
    return ko[: len(ko) - len(_SIG_MAGIC) - 12 - sig_len]


def module_order(moddir: Path, names: Iterable[str]) -> list[str]:
    """Paths (relative to ``moddir``) of ``names`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        if name not in by_name:
            raise GuestUnavailable(f"kernel module {name} not found in {moddir}")
        visit(by_name[name])
    return order


class Cpio:
    """Writes a newc cpio archive (the initramfs format) without needing root for device nodes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        self.out.write(head + b"\0" * (-len(head) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)


def _guest_scripts() -> tuple[bytes, bytes]:
    stage2 = (
        STAGE2.replace("@NETDEV@", GUEST_NETDEV).replace("@ADDR@", GUEST_ADDR).replace("@DEVICE@", GUEST_DEVICE)
    )
    return INIT.encode(), stage2.encode()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)  # two launchers building at once each write a whole file


def build_assets(kernel: Kernel, cache_root: Path | None = None) -> Assets:
    """vmlinux + initramfs for ``kernel``, from the cache or built now (a few seconds)."""
    cache_root = cache_root or Path(
        os.environ.get("MEMKV_VM_CACHE") or Path.home() / ".cache" / "memkv-rdma-guest"
    )
    busybox = busybox_binary()
    init, stage2 = _guest_scripts()
    key = hashlib.sha256()
    for part in (init, stage2, "\n".join(MODULES).encode()):
        key.update(part)
    for p in (kernel.vmlinuz, busybox, kernel.moddir / "modules.dep"):
        st = p.stat()
        key.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    cache = cache_root / kernel.version / key.hexdigest()[:16]
    assets = Assets(cache / "vmlinux", cache / "initramfs.cpio", kernel.version)
    if assets.kernel.exists() and assets.initrd.exists():
        return assets
    cache.mkdir(parents=True, exist_ok=True)

    _write_atomic(assets.kernel, extract_vmlinux(kernel.vmlinuz.read_bytes()))

    buf = io.BytesIO()
    cpio = Cpio(buf)
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)  # the kernel opens it for init before devtmpfs is mounted
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", init, 0o755)
    cpio.file("stage2", stage2, 0o644)
    order = module_order(kernel.moddir, MODULES)
    flat = []
    for rel in order:
        name = Path(rel).name
        flat.append(name)
        cpio.file(f"lib/modules/{name}", strip_signature((kernel.moddir / rel).read_bytes()))
    cpio.file("modules.order", ("\n".join(flat) + "\n").encode())
    cpio.finish()
    _write_atomic(assets.initrd, buf.getvalue())
    return assets


# ---------------------------------------------------------------- running the guest


def _accel() -> list[str]:
    """TCG unless /dev/kvm is a real kvm_intel/kvm_amd (a nested PVM /dev/kvm runs a stock
    kernel instruction by instruction). ``MEMKV_VM_ACCEL=tcg|kvm`` overrides."""
    choice = os.environ.get("MEMKV_VM_ACCEL", "auto")
    if choice == "auto":
        real_kvm = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
        choice = "kvm" if real_kvm and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    if choice == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def guest_env(env: Mapping[str, str], venv: Path | None) -> dict[str, str]:
    """The command's environment inside the guest: the caller's, the venv first on PATH, and the
    device the guest tests use."""
    out = {k: v for k, v in env.items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)}
    for k in ("PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST", "TMPDIR"):
        out.pop(k, None)  # the guest has its own cwd and shell; a TMPDIR may name a host-only mount
    if venv is not None:
        out["VIRTUAL_ENV"] = str(venv)
        out["PATH"] = f"{venv / 'bin'}:{out.get('PATH', '/usr/bin:/bin')}"
    out.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    out["PATH"] += ":/usr/sbin:/sbin"
    out["MEMKV_RDMA_DEVICE"] = GUEST_DEVICE
    out["MEMKV_RDMA_GID_INDEX"] = str(GUEST_GID_INDEX)
    out["MEMKV_RDMA_ADDR"] = GUEST_ADDR.split("/")[0]
    out["MEMKV_RDMA_IN_VM"] = "1"
    return out


def command_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    return f"cd {shlex.quote(str(cwd))} || exit 125\nexec env -i {assigns} {shlex.join(argv)}\n"


def _die_with_parent(parent: int) -> None:
    """In the QEMU child before exec: SIGKILL when the launcher dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


def _pump(src: int, dst: BinaryIO | None, keep: list[bytes] | None = None) -> None:
    with os.fdopen(src, "rb", buffering=0) as f:
        while chunk := f.read(65536):
            if keep is not None:
                keep.append(chunk)
            if dst is not None:
                dst.write(chunk)
                dst.flush()


@dataclass
class Result:
    status: int
    boot_s: float | None  # launch to "ready" (device up, command about to start)
    total_s: float
    reason: str = ""
    qemu_pid: int = 0


def run(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    venv: Path | None = None,
    timeout: float = 600.0,
    memory_mib: int = 3072,
    smp: int = 2,
    console: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> Result:
    """Boot the guest, run ``argv`` in it, power off. Raises :class:`GuestUnavailable` before
    booting when the host lacks something."""
    started = time.monotonic()
    kernel = check_host()
    assets = build_assets(kernel)
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr.buffer
    cwd = (cwd or Path.cwd()).resolve()
    genv = guest_env(os.environ if env is None else env, venv)

    with tempfile.TemporaryDirectory(prefix="memkv-vm-") as tmp:
        share = Path(tmp)
        (share / "command.sh").write_text(command_script(argv, cwd, genv))
        pipes = [os.pipe() for _ in range(3)]  # console, stdout, stderr
        qemu = [
            qemu_binary(),
            *_accel(),
            "-machine", "pc",  # microvm boots faster but hung in 3 of 4 tries here
            "-smp", str(smp),
            "-m", str(memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(assets.kernel),
            "-initrd", str(assets.initrd),
            "-append", os.environ.get("MEMKV_VM_APPEND", "console=ttyS0 quiet mitigations=off panic=-1"),
            "-chardev", f"file,id=con,path=/proc/self/fd/{pipes[0][1]}",
            "-serial", "chardev:con",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=runshare,path={share},security_model=none",
            "-device", "virtio-9p-pci,fsdev=runshare,mount_tag=runshare",
            "-device", "virtio-serial-pci",
            "-chardev", f"file,id=out,path=/proc/self/fd/{pipes[1][1]}",
            "-device", "virtserialport,chardev=out,name=memkv.stdout",
            "-chardev", f"file,id=err,path=/proc/self/fd/{pipes[2][1]}",
            "-device", "virtserialport,chardev=err,name=memkv.stderr",
        ]  # fmt: skip
        qemu_log = (share / "qemu.log").open("wb")
        parent = os.getpid()
        proc = subprocess.Popen(
            qemu,
            stdin=subprocess.DEVNULL,
            stdout=qemu_log,
            stderr=subprocess.STDOUT,
            pass_fds=[w for _, w in pipes],
            preexec_fn=lambda: _die_with_parent(parent),
        )
        qemu_log.close()
        for _, w in pipes:
            os.close(w)
        console_log: list[bytes] = []
        boot: list[float] = []

        def watch_console() -> None:
            with os.fdopen(pipes[0][0], "rb", buffering=0) as f:
                for line in f:
                    console_log.append(line)
                    if console is not None:
                        console.write(line)
                        console.flush()
                    if not boot and line.startswith(b"memkv-vm: ready"):
                        boot.append(time.monotonic() - started)

        threads = [
            threading.Thread(target=watch_console, daemon=True),
            threading.Thread(target=_pump, args=(pipes[1][0], stdout), daemon=True),
            threading.Thread(target=_pump, args=(pipes[2][0], stderr), daemon=True),
        ]
        for t in threads:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t in threads:
            t.join(timeout=10)
        total = time.monotonic() - started
        boot_s = boot[0] if boot else None
        if timed_out:
            why = f"timed out after {timeout:.0f} s" + _tail(console_log, share)
            return Result(EXIT_TIMEOUT, boot_s, total, why, proc.pid)
        status_file = share / "status"
        if status_file.exists():
            return Result(int(status_file.read_text().strip() or EXIT_NO_GUEST), boot_s, total, "", proc.pid)
        setup = share / "setup-error"
        why = f"guest setup failed: {setup.read_text().strip()}" if setup.exists() else "guest stopped without a status"
        why += f" (qemu exit {proc.returncode})" + _tail(console_log, share)
        return Result(EXIT_NO_GUEST, boot_s, total, why, proc.pid)


def _tail(console_log: list[bytes], share: Path) -> str:
    text = b"".join(console_log).decode(errors="replace").splitlines()[-30:]
    qlog = (share / "qemu.log").read_text(errors="replace").strip() if (share / "qemu.log").exists() else ""
    return "\n--- guest console (tail) ---\n" + "\n".join(text) + (f"\n--- qemu ---\n{qlog}" if qlog else "")


def default_venv() -> Path | None:
    venv = Path(os.environ.get("VIRTUAL_ENV") or REPO / ".venv")
    return venv if (venv / "bin" / "python").exists() else None


def main(args: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before QEMU is killed (exit 124)")
    p.add_argument("--memory", type=int, default=3072, help="guest memory in MiB")
    p.add_argument("--smp", type=int, default=2, help="guest CPUs")
    p.add_argument("--cwd", type=Path, default=None, help="working directory in the guest (default: this one)")
    p.add_argument("--venv", type=Path, default=None, help="venv put first on PATH (default: $VIRTUAL_ENV or ./.venv)")
    p.add_argument("--console", action="store_true", help="copy the guest console to stderr")
    p.add_argument("--check", action="store_true", help="only say whether the guest can start here (exit 0/125)")
    p.add_argument("-v", "--verbose", action="store_true", help="print boot and run times to stderr")
    p.add_argument("command", nargs="*")
    ns = p.parse_args(args)
    if ns.check:
        try:
            k = check_host()
            a = build_assets(k)
        except GuestUnavailable as exc:
            print(f"vm: unavailable: {exc}", file=sys.stderr)
            return EXIT_NO_GUEST
        print(f"vm: ready: kernel {k.version}, {a.kernel.parent}")
        return 0
    if not ns.command:
        p.error("no command (usage: vm.py [options] -- <command> [args...])")

    # SIGTERM/SIGHUP become SystemExit so run()'s cleanup kills QEMU (PDEATHSIG covers SIGKILL).
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        res = run(
            ns.command,
            cwd=ns.cwd,
            venv=ns.venv or default_venv(),
            timeout=ns.timeout,
            memory_mib=ns.memory,
            smp=ns.smp,
            console=sys.stderr.buffer if ns.console else None,
        )
    except GuestUnavailable as exc:
        print(f"vm: unavailable: {exc}", file=sys.stderr)
        return EXIT_NO_GUEST
    if res.reason:
        print(f"vm: {res.reason}", file=sys.stderr)
    if ns.verbose:
        boot = f"{res.boot_s:.1f} s" if res.boot_s is not None else "never"
        print(f"vm: boot to command {boot}, total {res.total_s:.1f} s, status {res.status}", file=sys.stderr)
    return res.status


if __name__ == "__main__":
    sys.exit(main())
