"""``QueuePair``'s fence/close/post ordering with a fake pyverbs (host-side: no verbs needed).

pyverbs' ``QP.close()`` NULLs the C pointer, so the fake raises where libibverbs would segfault:
any verb after close is a test failure. Real verbs: tests/rdma/guest."""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from lmcache_memkv.transport import rdma
from lmcache_memkv.transport.rdma import READ, QueuePair, RdmaError, _Waiter


class NullQP:
    """Stands in for pyverbs.qp.QP: every verb after close() is the segfault we must not reach."""

    def __init__(self, modify_fails: bool = False, on_modify: Any = None) -> None:
        self.closed = False
        self.modify_fails = modify_fails
        self.on_modify = on_modify
        self.states: list[str] = []
        self.posts = 0

    def _alive(self) -> None:
        if self.closed:
            raise AssertionError("verb on a destroyed QP (NULL pointer in real pyverbs)")

    @property
    def qp_num(self) -> int:
        self._alive()
        return 17

    def post_send(self, wr: Any) -> None:
        self._alive()
        self.posts += 1

    def modify(self, attr: Any, mask: int) -> None:
        self._alive()
        if self.on_modify is not None:
            self.on_modify()
        if self.modify_fails:
            raise RuntimeError("modify failed")
        self.states.append("ERR")

    def close(self) -> None:
        self.closed = True


class FakeDev:
    name = "fake0"
    gid = b"\2" * 16
    mtu = 3
    lid = 0
    gid_index = 0

    def __init__(self, poller: bool = True) -> None:
        self._e = types.SimpleNamespace(
            IBV_WR_RDMA_READ=1, IBV_WR_RDMA_WRITE=2, IBV_SEND_SIGNALED=4, IBV_QPS_ERR=6, IBV_QP_STATE=1
        )
        self._lock = threading.Lock()
        self._waiters: dict[int, tuple[_Waiter, QueuePair]] = {}
        self._ids = iter(range(1, 1 << 30))
        self._poller = object() if poller else None
        self._cq_slots = threading.BoundedSemaphore(64)
        self.failed: str | None = None

    _release = rdma.VerbsDevice._release
    _track = rdma.VerbsDevice._track
    _untrack = rdma.VerbsDevice._untrack
    _fail_all = rdma.VerbsDevice._fail_all


@pytest.fixture(autouse=True)
def fake_pyverbs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    class WR:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

        def set_wr_rdma(self, rkey: int, addr: int) -> None:
            pass

    wr = types.ModuleType("pyverbs.wr")
    wr.SGE = lambda *a: a  # type: ignore[attr-defined]
    wr.SendWR = WR  # type: ignore[attr-defined]
    qp = types.ModuleType("pyverbs.qp")
    qp.QPAttr = types.SimpleNamespace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyverbs", types.ModuleType("pyverbs"))
    monkeypatch.setitem(sys.modules, "pyverbs.wr", wr)
    monkeypatch.setitem(sys.modules, "pyverbs.qp", qp)
    monkeypatch.setattr(rdma, "_FLUSH_WAIT_S", 0.2)
    yield


def make_qp(dev: FakeDev | None = None, **kw: Any) -> QueuePair:
    qp = QueuePair.__new__(QueuePair)
    qp.dev = dev or FakeDev()  # type: ignore[assignment]
    qp.psn = 1
    qp.qp = NullQP(**kw)
    qp.qp_num = 17
    qp._slots = threading.BoundedSemaphore(4)
    qp._lock = threading.Lock()
    qp.fenced = False
    qp.closed = False
    qp._flushed = threading.Event()
    qp._fence_safe = False
    qp.peer = object()  # type: ignore[assignment]
    return qp


OP = [(READ, 0x1000, 1, 8, 0x2000, 2)]


def test_post_after_close_raises_instead_of_touching_the_qp() -> None:
    qp = make_qp()
    qp.close()
    assert qp.qp.closed and qp.closed
    with pytest.raises(RdmaError, match=r"closed|fenced"):
        qp.post_and_wait(OP, time.monotonic() + 1)
    assert qp.qp.posts == 0


def test_a_second_fence_waits_for_the_first_and_close_never_races_modify() -> None:
    """Thread A is inside modify(ERR); B's fence must not return (nor B's close destroy) before it."""
    in_modify, release = threading.Event(), threading.Event()

    def slow_modify() -> None:
        in_modify.set()
        release.wait(5)

    qp = make_qp(dev=FakeDev(poller=False), on_modify=slow_modify)
    a = threading.Thread(target=qp.fence)
    a.start()
    assert in_modify.wait(5)
    b_done = threading.Event()
    b = threading.Thread(target=lambda: (qp.close(), b_done.set()))
    b.start()
    time.sleep(0.1)
    assert not b_done.is_set()  # B waits: the QP is not yet fenced
    release.set()
    a.join(5)
    b.join(5)
    assert b_done.is_set() and qp.qp.states == ["ERR"] and qp.qp.closed


def test_post_racing_close_never_posts_to_a_destroyed_qp() -> None:
    errors: list[BaseException] = []
    for _ in range(200):
        qp = make_qp(dev=FakeDev(poller=False))

        def post(qp: QueuePair = qp) -> None:
            try:
                qp.post_and_wait(OP, time.monotonic() + 0.01)
            except (RdmaError, rdma.MemKVTimeout):
                pass
            except BaseException as exc:  # the AssertionError of a verb on NULL
                errors.append(exc)

        t = threading.Thread(target=post)
        t.start()
        qp.close()
        t.join(5)
    assert not errors, errors[0]


def test_failed_modify_destroys_the_qp_and_fails_its_waiters() -> None:
    dev = FakeDev()
    qp = make_qp(dev=dev, modify_fails=True)
    w = _Waiter()
    dev._track(w, qp)
    assert qp._slots.acquire(timeout=0) and dev._cq_slots.acquire(timeout=0)
    assert qp.fence() is True  # destroyed: ibv_destroy_qp guarantees no further access
    assert qp.qp.closed and w.error is not None and not dev._waiters
    assert qp.fence() is True  # later callers get the same answer


def test_unflushed_work_requests_make_the_fence_unconfirmed() -> None:
    dev = FakeDev()
    qp = make_qp(dev=dev)
    dev._track(_Waiter(), qp)  # a completion that never comes back
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.append(qp.fence()))
    t.start()
    results.append(qp.fence())  # the second caller waits for the first's verdict
    t.join(5)
    assert results == [False, False]


def test_poller_sets_the_error_before_the_slot_comes_back() -> None:
    """A poster woken by the released slot must already see the failure (no post after a flush)."""
    seen: list[str | None] = []
    dev = FakeDev()
    qp = make_qp(dev=dev)
    w = _Waiter()
    wr_id = dev._track(w, qp)
    qp._slots = threading.BoundedSemaphore(1)
    qp._slots.acquire()
    dev._cq_slots.acquire()

    class Slots:
        def release(self) -> None:
            seen.append(w.error)

    qp._slots = Slots()  # type: ignore[assignment]

    class CQ:
        def __init__(self) -> None:
            self.n = 0

        def poll(self, num_entries: int) -> tuple[int, list[Any]]:
            self.n += 1
            if self.n == 1:
                return 1, [types.SimpleNamespace(wr_id=wr_id, status=5)]
            stop.set()
            return 0, []

    stop = threading.Event()
    poller = types.SimpleNamespace(
        _stop=stop, _e=types.SimpleNamespace(IBV_WC_SUCCESS=0), cq=CQ(), name="fake0",
        _lock=dev._lock, _waiters=dev._waiters, _fail_all=dev._fail_all, _release=dev._release,
    )  # fmt: skip
    for name in ("_poll", "_complete", "_die"):
        setattr(poller, name, types.MethodType(getattr(rdma.VerbsDevice, name), poller))
    rdma.VerbsDevice._poll_loop(poller)  # type: ignore[arg-type]
    assert seen and seen[0] is not None


def test_the_completion_queue_bounds_outstanding_work_requests_device_wide() -> None:
    """Two QPs, a CQ of 2 entries: the third post waits for a CQ slot (then times out at its
    deadline) instead of overrunning the CQ; its QP slot is given back."""
    dev = FakeDev()
    dev._cq_slots = threading.BoundedSemaphore(2)
    a, b = make_qp(dev=dev), make_qp(dev=dev)
    results: list[BaseException | None] = []

    def post(qp: QueuePair, n: int) -> None:
        try:
            qp.post_and_wait(OP * n, time.monotonic() + 0.3)
            results.append(None)
        except BaseException as exc:
            results.append(exc)

    post(a, 2)  # both posted, never completed: the CQ is full until the poller reaps them
    post(b, 1)
    assert a.qp.posts == 2 and b.qp.posts == 0
    assert isinstance(results[1], rdma.MemKVTimeout) and "completion queue full" in str(results[1])
    assert b._slots.acquire(blocking=False)  # its QP slot came back
    b._slots.release()
    dev._fail_all("reaped")  # the completions: both CQ slots back
    assert dev._cq_slots.acquire(blocking=False) and dev._cq_slots.acquire(blocking=False)


# ---------------------------------------------------------------------- the node's session table


class FakeVerbs:
    """Stands in for VerbsDevice under RdmaSessions: QPs created on it after close() would be the
    segfault (create_qp on a closed PD/CQ)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.closed = False
        self.failed: str | None = None
        self.gate = gate
        self.entered = threading.Event()
        self.qps: list[QueuePair] = []

    def create_qp(self) -> QueuePair:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        if self.closed:
            raise AssertionError("create_qp on a closed device (segfault in real pyverbs)")
        qp = make_qp(dev=FakeDev(poller=False))
        qp.peer = None
        qp.connect = lambda peer: None  # type: ignore[method-assign]
        self.qps.append(qp)
        return qp

    def close(self) -> None:
        self.closed = True


def sessions_on(dev: FakeVerbs) -> Any:
    from lmcache_memkv.node.rdma import RdmaSessions

    s = RdmaSessions.__new__(RdmaSessions)
    s.device = dev  # type: ignore[assignment]
    s._max = 4
    s._idle_evict_s = 60.0
    s._sessions = __import__("collections").OrderedDict()
    s._lock = threading.Lock()
    s._open_lock = threading.Lock()
    s.closed = False
    s._device_closed = False
    s._quiesced = []
    s._closers = []
    return s


PEER = rdma.QpInfo(qp_num=5, gid=b"\1" * 16, psn=1, mtu=3)
REGION = rdma.Region(addr=0x1000, length=4096, lkey=0, rkey=9)


def test_open_after_close_is_refused_not_a_qp_on_a_closed_device() -> None:
    dev = FakeVerbs()
    s = sessions_on(dev)
    s.close()
    assert dev.closed
    with pytest.raises(RdmaError, match="shutting down"):
        s.open(b"c" * 16, PEER, REGION)


def test_close_waits_for_an_open_under_way_and_closes_its_qp() -> None:
    gate = threading.Event()
    dev = FakeVerbs(gate)
    s = sessions_on(dev)
    t = threading.Thread(target=s.open, args=(b"c" * 16, PEER, REGION))
    t.start()
    assert dev.entered.wait(5)
    closer = threading.Thread(target=s.close)
    closer.start()
    time.sleep(0.05)
    assert not dev.closed  # close() waits for the open under way
    gate.set()
    t.join(5)
    closer.join(5)
    assert dev.closed and len(dev.qps) == 1 and dev.qps[0].closed


def test_quiesce_fences_sessions_refuses_new_ones_and_close_destroys_them() -> None:
    dev = FakeVerbs()
    s = sessions_on(dev)
    s.open(b"c" * 16, PEER, REGION)
    qp = dev.qps[0]
    s.quiesce()
    assert qp.fenced and not qp.closed and not dev.closed  # a worker may still hold it
    with pytest.raises(RdmaError, match="shutting down"):
        s.open(b"d" * 16, PEER, REGION)
    s.close()
    assert qp.closed and dev.closed
    s.close()  # idempotent


def _client(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_a_full_table_of_recent_sessions_refuses_the_hello_and_evicts_nothing() -> None:
    from lmcache_memkv.node.rdma import SessionsExhausted

    dev = FakeVerbs()
    s = sessions_on(dev)
    for i in range(4):
        s.open(_client(i), PEER, REGION)
    with pytest.raises(SessionsExhausted, match="--max-rdma-sessions"):
        s.open(_client(9), PEER, REGION)
    assert s.sessions() == 4 and not any(qp.fenced for qp in dev.qps)
    assert len(dev.qps) == 4  # refused before any queue pair was made


def test_at_the_cap_only_a_session_idle_past_the_bound_is_evicted() -> None:
    dev = FakeVerbs()
    s = sessions_on(dev)
    for i in range(4):
        s.open(_client(i), PEER, REGION)
    tokens = list(s._sessions)
    now = time.monotonic()
    s._sessions[tokens[0]].last_used = now - 5.0  # the least recently used, but recent
    s._sessions[tokens[1]].last_used = now - 61.0  # idle past the bound
    s._sessions.move_to_end(tokens[1], last=False)  # oldest in LRU order
    s.open(_client(9), PEER, REGION)
    assert s.sessions() == 4 and tokens[1] not in s._sessions and tokens[0] in s._sessions
    for t in s._closers:
        t.join(5)
    assert dev.qps[1].closed and not dev.qps[0].closed
    # The next one finds none idle: refused.
    with pytest.raises(RdmaError, match="in use"):
        s.open(_client(10), PEER, REGION)


def test_a_client_re_hello_at_the_cap_replaces_its_own_session() -> None:
    dev = FakeVerbs()
    s = sessions_on(dev)
    for i in range(4):
        s.open(_client(i), PEER, REGION)
    s.open(_client(2), PEER, REGION)  # its fenced session's replacement: always room
    assert s.sessions() == 4
    for t in s._closers:
        t.join(5)
    assert dev.qps[2].closed and not any(qp.closed for i, qp in enumerate(dev.qps) if i != 2)



def test_an_unusable_device_refuses_new_sessions() -> None:
    dev = FakeVerbs()
    s = sessions_on(dev)
    dev.failed = "completion queue failed: boom"
    with pytest.raises(RdmaError, match="unusable"):
        s.open(_client(1), PEER, REGION)


def _poller_on(dev: FakeDev, cq: Any, stop: threading.Event) -> Any:
    poller = types.SimpleNamespace(
        _stop=stop, _e=types.SimpleNamespace(IBV_WC_SUCCESS=0), cq=cq, name="fake0", failed=None,
        _lock=dev._lock, _waiters=dev._waiters, _fail_all=dev._fail_all, _release=dev._release,
    )  # fmt: skip
    for name in ("_poll", "_complete", "_die"):
        setattr(poller, name, types.MethodType(getattr(rdma.VerbsDevice, name), poller))
    return poller


def test_a_bad_completion_is_skipped_and_the_poller_goes_on() -> None:
    dev = FakeDev()
    qp = make_qp(dev=dev)
    w = _Waiter()
    wr_id = dev._track(w, qp)
    qp._slots.acquire()
    dev._cq_slots.acquire()
    stop = threading.Event()

    class CQ:
        n = 0

        def poll(self, num_entries: int) -> tuple[int, list[Any]]:
            self.n += 1
            if self.n == 1:  # a completion the poller cannot read, then a good one
                return 2, [types.SimpleNamespace(wr_id="junk", status=0), types.SimpleNamespace(wr_id=wr_id, status=0)]
            stop.set()
            return 0, []

    poller = _poller_on(dev, CQ(), stop)
    rdma.VerbsDevice._poll_loop(poller)
    assert w.done == 1 and w.error is None and poller.failed is None


def test_a_dead_poller_fails_every_waiter_at_once_and_the_device_refuses_posts() -> None:
    dev = FakeDev()
    qp = make_qp(dev=dev)
    errors: list[BaseException] = []

    def transfer() -> None:
        try:
            qp.post_and_wait(OP, time.monotonic() + 30)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=transfer)
    t.start()
    deadline = time.monotonic() + 5
    while not dev._waiters and time.monotonic() < deadline:
        time.sleep(0.005)

    class CQ:
        def poll(self, num_entries: int) -> tuple[int, list[Any]]:
            raise RuntimeError("device lost")

    poller = _poller_on(dev, CQ(), threading.Event())
    t0 = time.monotonic()
    rdma.VerbsDevice._poll_loop(poller)
    t.join(5)
    assert time.monotonic() - t0 < 2 and errors and "device lost" in str(errors[0])  # not at the 30 s deadline
    assert poller.failed and "device lost" in poller.failed
    dev.failed = poller.failed  # the same object in the real device
    with pytest.raises(RdmaError, match="unusable"):
        qp.post_and_wait(OP, time.monotonic() + 1)

    class Broken:
        def poll(self, num_entries: int) -> tuple[int, list[Any]]:
            raise KeyboardInterrupt  # not an Exception: the outer guard still fails the waiters

    poller = _poller_on(dev, Broken(), threading.Event())
    with pytest.raises(KeyboardInterrupt):
        rdma.VerbsDevice._poll_loop(poller)
    assert poller.failed and "poller failed" in poller.failed
