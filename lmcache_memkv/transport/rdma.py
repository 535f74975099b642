"""RDMA (verbs) transport: a thin layer over pyverbs, imported lazily so TCP-only hosts never load it.

One ``VerbsDevice`` per process side: it opens the device by name, allocates a protection
domain, registers memory regions (the node's arena once, the adapter's L1 pool once) and owns
one completion queue with one poller thread. ``QueuePair`` is an RC queue pair brought through
INIT, RTR and RTS from the peer's QPN, GID, PSN and MTU. Only the node posts work requests (it
READs PUT values from client pages and WRITEs GET values into them), so the client's queue pair
is a passive responder and the client needs no poller. ``post_and_wait`` keeps at most
``max_outstanding`` work requests in flight per queue pair and waits for them against a deadline;
``fence`` moves the queue pair to the error state, which flushes what is outstanding and makes
the device refuse every later access through it, so a timed-out transfer can never land late.
A fenced queue pair is not reused: a new one is set up over ``Session.Hello``.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmcache_memkv.errors import MemKVError, MemKVTimeout

log = logging.getLogger("memkv.rdma")

READ = "read"
WRITE = "write"
# Completion queue entries (cut to the device's max_cqe). Every signaled work request takes one
# until the poller reaps it, and a CQ overrun puts the CQ (and every QP on it) in error, so the
# device also holds a semaphore of this size: at most this many work requests are outstanding
# across all queue pairs (workers x 16 per QP can exceed it; a poster then waits for a slot
# within its deadline instead of overrunning the CQ).
_CQ_ENTRIES = 4096
_MAX_OUTSTANDING = 16  # work requests in flight per queue pair (node-driven, so the node bounds its own burst)
_POLL_BATCH = 32
_IDLE_SLEEP_MAX_S = 0.001  # the poller backs off to this when the CQ is quiet
_FLUSH_WAIT_S = 2.0  # after moving a QP to ERR: how long we wait for the flushed completions
_SYSFS = "/sys/class/infiniband"
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}


class RdmaError(MemKVError):
    """A verbs call or a work request failed (the queue pair is then unusable)."""


class SessionsExhausted(RdmaError):
    """The node's session table is full of recently used sessions: the Hello is refused
    (RESOURCE_EXHAUSTED), nobody's busy session is evicted for it."""


def rdma_devices(wanted: Sequence[str] = ()) -> list[str]:
    """Names of usable RDMA devices (restricted to ``wanted`` when given); [] without pyverbs.

    The kernel's device list is read first, so a host without verbs never imports pyverbs.
    """
    try:
        if not os.listdir(_SYSFS):
            return []
    except OSError:
        return []
    try:
        import pyverbs.device as d
    except ImportError:
        return []
    try:
        names = [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name) for dev in d.get_device_list()]
    except Exception as exc:  # pyverbs raises its own errors when the kernel lacks verbs
        log.debug("no RDMA devices: %s", exc)
        return []
    if wanted:
        names = [n for n in names if n in set(wanted)]
    return names


def env_devices(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """``MEMKV_RDMA_DEVICES`` (comma-separated) as a tuple; empty when unset."""
    raw = (os.environ if environ is None else environ).get("MEMKV_RDMA_DEVICES", "")
    return tuple(p.strip() for p in raw.split(",") if p.strip())


# ---------------------------------------------------------------------- buffer addresses


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PYBUF_SIMPLE = 0


def buffer_address(buf: Any) -> tuple[int, int]:
    """(address, length) of a contiguous buffer, read-only ones included, without copying it.

    The address stays valid only while the caller keeps ``buf`` (and what it views) alive.
    """
    pb = _PyBuffer()
    _get_buffer(buf, ctypes.byref(pb), _PYBUF_SIMPLE)  # raises BufferError for non-contiguous views
    try:
        return int(pb.buf or 0), int(pb.len)
    finally:
        _release_buffer(ctypes.byref(pb))


# ---------------------------------------------------------------------- addressing


@dataclass(frozen=True)
class QpInfo:
    """What a peer needs to connect to one queue pair (carried in ``Session.Hello``)."""

    qp_num: int
    gid: bytes  # 16 bytes
    psn: int
    mtu: int  # IBV_MTU enum value (1..5)
    lid: int = 0
    gid_index: int = 0

    def check(self) -> None:
        """Everything a peer sent, bounded before use."""
        if len(self.gid) != 16:
            raise ValueError(f"GID must be 16 bytes, got {len(self.gid)}")
        if not 0 < self.qp_num < 1 << 24:
            raise ValueError(f"QP number {self.qp_num} out of range")
        if not 0 <= self.psn < 1 << 24:
            raise ValueError(f"PSN {self.psn} out of range")
        if self.mtu not in MTU_BYTES:
            raise ValueError(f"MTU {self.mtu} is not an IBV_MTU value")
        if not 0 <= self.lid < 1 << 16 or not 0 <= self.gid_index < 256:
            raise ValueError("LID or GID index out of range")


@dataclass(frozen=True)
class Region:
    """A registered memory region: what the local side posts with (lkey) and the peer targets (rkey)."""

    addr: int
    length: int
    lkey: int
    rkey: int

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length


def gid_text(raw: bytes) -> str:
    h = raw.hex()
    return ":".join(h[i : i + 4] for i in range(0, 32, 4))


# ---------------------------------------------------------------------- device


class _Waiter:
    """One caller's batch of work requests: counts completions, remembers the first failure."""

    __slots__ = ("cond", "done", "error", "posted")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.posted = 0
        self.done = 0
        self.error: str | None = None


class VerbsDevice:
    """One opened device: context, protection domain, one CQ and its poller, registered regions."""

    def __init__(self, name: str, port: int = 1, gid_index: int = 0, max_outstanding: int = _MAX_OUTSTANDING) -> None:
        try:
            import pyverbs.enums as e
            from pyverbs.cq import CQ
            from pyverbs.device import Context
            from pyverbs.pd import PD
        except ImportError as exc:
            raise RdmaError(f"RDMA: pyverbs cannot be imported ({exc}); install rdma-core's python3-pyverbs") from None
        self._e = e
        self.name = name
        self.port = port
        self.gid_index = gid_index
        self.max_outstanding = max_outstanding
        try:
            self.ctx = Context(name=name)
        except Exception as exc:
            raise RdmaError(f"RDMA device {name!r} cannot be opened: {exc}") from None
        try:
            port_attr = self.ctx.query_port(port)
            if port_attr.state != e.IBV_PORT_ACTIVE:
                raise RdmaError(f"RDMA device {name!r} port {port} is not active (state {port_attr.state})")
            self.mtu = int(port_attr.active_mtu)
            self.lid = int(port_attr.lid)
            gid = self.ctx.query_gid(port, gid_index)
            self.gid = bytes.fromhex(str(gid.gid).replace(":", ""))
            if not any(self.gid):
                raise RdmaError(f"RDMA device {name!r} port {port} has no GID at index {gid_index}")
            attr = self.ctx.query_device()
            self.max_rd_atom = max(1, min(int(attr.max_qp_rd_atom), int(attr.max_qp_init_rd_atom), max_outstanding))
            self.pd = PD(self.ctx)
            self.cq_entries = max(1, min(_CQ_ENTRIES, int(attr.max_cqe)))
            self.cq = CQ(self.ctx, self.cq_entries, None, None, 0)
        except RdmaError:
            self.ctx.close()
            raise
        except Exception as exc:
            self.ctx.close()
            raise RdmaError(f"RDMA device {name!r} port {port} GID index {gid_index}: {exc}") from None
        self._cq_slots = threading.BoundedSemaphore(self.cq_entries)  # see _CQ_ENTRIES
        self._mrs: list[Any] = []
        self._waiters: dict[int, tuple[_Waiter, QueuePair]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._closed = False
        self.failed: str | None = None  # set when the poller died: no new posts, no new sessions

    def register(self, addr: int, length: int, remote: bool) -> Region:
        """Register ``[addr, addr+length)`` once; ``remote``: the peer may READ and WRITE it."""
        e = self._e
        from pyverbs.mr import MR

        access = e.IBV_ACCESS_LOCAL_WRITE
        if remote:
            access |= e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
        try:
            mr = MR(self.pd, length, access, address=addr)
        except Exception as exc:
            raise RdmaError(f"RDMA: cannot register {length} bytes at 0x{addr:x} on {self.name}: {exc}") from None
        self._mrs.append(mr)
        return Region(addr=addr, length=length, lkey=int(mr.lkey), rkey=int(mr.rkey))

    def create_qp(self) -> QueuePair:
        return QueuePair(self)

    def start_poller(self) -> None:
        """The node's completion poller (the client posts nothing and needs none)."""
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name=f"memkv-cq-{self.name}", daemon=True)
            self._poller.start()

    def _poll_loop(self) -> None:
        # Without the poller nothing completes: every transfer would wait out its deadline while
        # the node still takes sessions. So one bad completion is logged and skipped, and anything
        # else that stops the loop fails every waiter at once and marks the device unusable.
        try:
            self._poll()
        except BaseException as exc:
            self._die(f"completion poller failed: {type(exc).__name__}: {exc}")
            raise

    def _poll(self) -> None:
        idle = 0.0
        while not self._stop.is_set():
            try:
                n, wcs = self.cq.poll(num_entries=_POLL_BATCH)
            except Exception as exc:  # the CQ itself failed: nothing more will complete
                self._die(f"completion queue failed: {exc}")
                return
            if not n:
                idle = min(_IDLE_SLEEP_MAX_S, idle * 2 or 20e-6)
                time.sleep(idle)
                continue
            idle = 0.0
            for wc in wcs[:n]:
                try:
                    self._complete(wc)
                except Exception:
                    log.exception("RDMA: bad completion on %s (skipped)", self.name)

    def _complete(self, wc: Any) -> None:
        with self._lock:
            entry = self._waiters.pop(int(wc.wr_id), None)
        if entry is None:
            return
        waiter, qp = entry
        # The error first, then the slot: a poster that gets this slot back must see the
        # failure before it posts again.
        try:
            with waiter.cond:
                waiter.done += 1
                if wc.status != self._e.IBV_WC_SUCCESS and waiter.error is None:
                    waiter.error = f"work request failed: status {wc.status}"
                waiter.cond.notify_all()
        finally:
            self._release(qp)

    def _die(self, why: str) -> None:
        """The poller is gone: refuse new posts (``failed`` first, so a post racing this either
        sees it or is failed below) and fail every outstanding work request now."""
        log.error("RDMA device %s unusable: %s", self.name, why)
        self.failed = why
        self._fail_all(why)

    def _fail_all(self, why: str, only: QueuePair | None = None) -> None:
        """Complete outstanding work requests with ``why`` (those of ``only`` when given)."""
        with self._lock:
            if only is None:
                entries, self._waiters = list(self._waiters.values()), {}
            else:
                ids = [i for i, (_, qp) in self._waiters.items() if qp is only]
                entries = [self._waiters.pop(i) for i in ids]
        for waiter, qp in entries:
            with waiter.cond:
                waiter.done += 1
                waiter.error = waiter.error or why
                waiter.cond.notify_all()
            self._release(qp)

    def _release(self, qp: QueuePair) -> None:
        """A work request's completion was reaped (or will never come): its QP slot and CQ slot back."""
        qp._slots.release()
        self._cq_slots.release()

    def _track(self, waiter: _Waiter, qp: QueuePair) -> int:
        wr_id = next(self._ids)
        with self._lock:
            self._waiters[wr_id] = (waiter, qp)
        return wr_id

    def _untrack(self, wr_id: int) -> None:
        with self._lock:
            self._waiters.pop(wr_id, None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._poller is not None:
            self._poller.join(2)
        for mr in self._mrs:
            try:
                mr.close()
            except Exception:
                pass
        try:
            self.ctx.close()  # closes the PD, CQ and QPs pyverbs tracks under it
        except Exception as exc:
            log.debug("closing %s: %s", self.name, exc)


class QueuePair:
    """One RC queue pair on a ``VerbsDevice``.

    pyverbs' ``QP.close()`` NULLs the C pointer, and any later verb through it would hand NULL to
    libibverbs (a segfault), so every verb that may race with ``close`` runs under ``_lock`` and
    checks ``closed`` first.
    """

    def __init__(self, dev: VerbsDevice) -> None:
        from pyverbs.qp import QP, QPCap, QPInitAttr

        e = dev._e
        self.dev = dev
        self.psn = int.from_bytes(os.urandom(3), "big")
        cap = QPCap(max_send_wr=dev.max_outstanding, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=dev.cq, rcq=dev.cq, cap=cap, sq_sig_all=1)
        try:
            self.qp = QP(dev.pd, init)
        except Exception as exc:
            raise RdmaError(f"RDMA: cannot create a queue pair on {dev.name}: {exc}") from None
        self.qp_num = int(self.qp.qp_num)  # cached: reading it after close would dereference NULL
        self._slots = threading.BoundedSemaphore(dev.max_outstanding)
        self._lock = threading.Lock()  # guards fenced/closed against post_send, modify and destroy
        self.fenced = False
        self.closed = False
        self._flushed = threading.Event()  # set once the first fence() knows whether it is safe
        self._fence_safe = False
        self.peer: QpInfo | None = None

    @property
    def info(self) -> QpInfo:
        d = self.dev
        return QpInfo(qp_num=self.qp_num, gid=d.gid, psn=self.psn, mtu=d.mtu, lid=d.lid, gid_index=d.gid_index)

    def connect(self, peer: QpInfo) -> None:
        """RESET -> INIT -> RTR -> RTS towards ``peer`` (checked first: it came over the network)."""
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        peer.check()
        d = self.dev
        e = d._e
        with self._lock:
            if self.closed or self.fenced:
                raise RdmaError("RDMA queue pair was fenced or closed before it was connected")
            try:
                # One attribute set, RESET -> INIT -> RTR -> RTS in pyverbs' to_rts.
                attr = QPAttr()
                attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
                attr.port_num = d.port
                attr.pkey_index = 0
                attr.path_mtu = min(d.mtu, peer.mtu)
                attr.dest_qp_num = peer.qp_num
                attr.rq_psn = peer.psn
                attr.sq_psn = self.psn
                attr.max_dest_rd_atomic = d.max_rd_atom
                attr.max_rd_atomic = d.max_rd_atom
                attr.min_rnr_timer = 12
                attr.timeout = 14  # 4.096us * 2^14 = 67 ms per try: a dead peer fails the WR in about half a second
                attr.retry_cnt = 7
                attr.rnr_retry = 7
                gr = GlobalRoute(dgid=GID(gid_text(peer.gid)), sgid_index=d.gid_index, hop_limit=64)
                attr.ah_attr = AHAttr(gr=gr, is_global=1, port_num=d.port, dlid=peer.lid)
                self.qp.to_rts(attr)
            except Exception as exc:
                raise RdmaError(f"RDMA: cannot connect a queue pair on {d.name} to QP {peer.qp_num}: {exc}") from None
            self.peer = peer

    def post_and_wait(
        self,
        ops: Sequence[tuple[str, int, int, int, int, int]],
        deadline: float,
        before_wait: Callable[[], None] | None = None,
    ) -> None:
        """Run ``(kind, local_addr, lkey, length, remote_addr, rkey)`` operations, at most the
        device's bound outstanding at once, and return once every one completed successfully.

        Raises ``MemKVTimeout`` at the deadline and ``RdmaError`` on a failed work request or a
        fenced or closed queue pair; either way the caller must ``fence`` before it reuses (or lets
        anyone reuse) the local memory. ``before_wait`` is a test hook: it runs after the posts,
        before the wait.
        """
        self._check_usable()
        from pyverbs.wr import SGE, SendWR

        e = self.dev._e
        waiter = _Waiter()
        opcode = {READ: e.IBV_WR_RDMA_READ, WRITE: e.IBV_WR_RDMA_WRITE}
        for kind, laddr, lkey, length, raddr, rkey in ops:
            left = deadline - time.monotonic()
            if left <= 0 or not self._slots.acquire(timeout=left):
                raise MemKVTimeout(f"RDMA: no free work request slot within the deadline ({waiter.done} done)")
            if not self.dev._cq_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self._slots.release()
                raise MemKVTimeout(f"RDMA: completion queue full (device-wide) within the deadline ({waiter.done} done)")
            with waiter.cond:
                if waiter.error is not None:
                    self.dev._release(self)
                    raise RdmaError(f"RDMA {kind}: {waiter.error}")
            wr_id = self.dev._track(waiter, self)
            wr = SendWR(wr_id=wr_id, opcode=opcode[kind], num_sge=1, sg=[SGE(laddr, length, lkey)],
                        send_flags=e.IBV_SEND_SIGNALED)  # fmt: skip
            wr.set_wr_rdma(rkey, raddr)
            # The check and the post under one lock: a fence or close between them would have us
            # post to a fenced queue pair (a WR nobody flushes) or to a destroyed one (NULL).
            with self._lock:
                try:
                    self._check_usable()
                    self.qp.post_send(wr)
                except Exception as exc:
                    self.dev._untrack(wr_id)
                    self.dev._release(self)
                    if isinstance(exc, RdmaError):
                        raise
                    raise RdmaError(f"RDMA: posting a {kind} of {length} bytes failed: {exc}") from None
            with waiter.cond:
                waiter.posted += 1
        if before_wait is not None:
            before_wait()
        with waiter.cond:
            while waiter.done < waiter.posted and waiter.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MemKVTimeout(f"RDMA: {waiter.posted - waiter.done} of {waiter.posted} transfers incomplete at the deadline")
                waiter.cond.wait(left)
            if waiter.error is not None:
                raise RdmaError(f"RDMA: {waiter.error}")

    def _check_usable(self) -> None:
        if self.dev.failed is not None:
            raise RdmaError(f"RDMA device {self.dev.name} is unusable: {self.dev.failed}")
        if self.closed:
            raise RdmaError("RDMA queue pair was closed; set up a new session")
        if self.fenced:
            raise RdmaError("RDMA queue pair was fenced; set up a new session")

    def fence(self) -> bool:
        """Make sure the device takes no further access through this queue pair; True once that
        is known, False if it cannot be (then the local memory it addressed must never be reused).

        The first caller moves the queue pair to ERR (outstanding work requests are flushed and
        the device refuses later access) and waits, bounded, for the flushed completions; every
        other caller waits for that outcome (bounded) instead of returning early. If ERR cannot
        be set, the queue pair is destroyed: ``ibv_destroy_qp`` guarantees no access after it."""
        with self._lock:
            first = not self.fenced
            self.fenced = True
            if first:
                if self.closed or self.peer is None:
                    # Destroyed, or never connected: the device can reach no memory through it.
                    self._fence_safe = True
                    self._flushed.set()
                    return True
                from pyverbs.qp import QPAttr

                e = self.dev._e
                try:
                    attr = QPAttr()
                    attr.qp_state = e.IBV_QPS_ERR
                    self.qp.modify(attr, e.IBV_QP_STATE)
                except Exception as exc:
                    log.error("RDMA: cannot move QP %d to ERR (%s): destroying it instead", self.qp_num, exc)
                    self._fence_safe = self._destroy_locked()
                    self.dev._fail_all("queue pair destroyed after a failed fence", only=self)
                    self._flushed.set()
                    return self._fence_safe
        if not first:
            if not self._flushed.wait(_FLUSH_WAIT_S + 1.0):
                return False  # the first fencer is stuck: assume the worst
            return self._fence_safe
        self._fence_safe = self._wait_flushed()
        self._flushed.set()
        return self._fence_safe

    def _wait_flushed(self) -> bool:
        """Wait (bounded) until none of our work requests is outstanding; False at the bound."""
        if self.dev._poller is None:
            return True  # no poller (client side): nothing of ours is outstanding
        deadline = time.monotonic() + _FLUSH_WAIT_S
        while time.monotonic() < deadline:
            with self.dev._lock:
                pending = any(qp is self for _, qp in self.dev._waiters.values())
            if not pending:
                return True
            time.sleep(0.001)
        log.warning("RDMA: QP %d still had unflushed work requests %.1fs after ERR", self.qp_num, _FLUSH_WAIT_S)
        return False

    def _destroy_locked(self) -> bool:
        """Destroy the QP (caller holds ``_lock``); True if the device confirmed it."""
        if self.closed:
            return True
        self.closed = True  # first: nobody may pass the pointer pyverbs is about to NULL
        try:
            self.qp.close()
            return True
        except Exception as exc:
            log.error("RDMA: destroying QP %d failed: %s", self.qp_num, exc)
            return False

    def close(self) -> None:
        """Fence, then destroy. Safe from any thread, any number of times."""
        self.fence()
        with self._lock:
            self._destroy_locked()
