"""``ClusterClient``: the whole MemKV cluster behind one thread-safe object.

Placement is rendezvous hashing over the ALIVE members of the view the client watches; with
``replicas=R`` a key lives on its top-R nodes. Writes go to all R (batched per node, nodes in
parallel); reads and lookups try the replicas in order and fail over on error or miss. A node
that fails a call is skipped for a short back-off (``LocalSuspicion``) until the view catches
up. Every public call is bounded by ``timeout_s`` in total: when a call may need several
rounds (fail-over), each round gets an equal share of what is left.

Node calls run in per-node lanes (``lanes.py``): a frozen node holds only its own lane's threads
and slots, and a call never waits past its deadline (plus a short scheduling grace) for any. Each
node request carries at most ``_CHUNK`` keys; when one fails, the chunks that were answered before
it keep their results (and their leases are recorded, so they are released later).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from functools import partial
from typing import Any, TypeVar

import grpc

from lmcache_memkv.client.node_client import TCP_CLIENT
from lmcache_memkv.client.protocol import DataClient, DataClientFactory
from lmcache_memkv.cluster.bootstrap import control_endpoints, fetch_view
from lmcache_memkv.cluster.cluster_id import ClusterIdentity
from lmcache_memkv.cluster.lanes import DEFAULT_THREADS_PER_NODE, LaneBusy, NodeLanes
from lmcache_memkv.cluster.leases import MAX_ATTEMPTS, LeaseBook, OwedRelease, ReleaseQueue
from lmcache_memkv.cluster.suspicion import LocalSuspicion
from lmcache_memkv.cluster.view import ClusterView
from lmcache_memkv.cluster.watch import ViewWatcher
from lmcache_memkv.control.channel import ChannelPool, describe_rpc_error
from lmcache_memkv.control.member import Member, State
from lmcache_memkv.control.peers import wait_all
from lmcache_memkv.control.stats import stats_dict
from lmcache_memkv.control.tls import ca_from_env
from lmcache_memkv.endpoints import parse_endpoint
from lmcache_memkv.errors import ConfigError, ConnectError, MemKVError, MemKVTimeout, ProtocolError, ServerError
from lmcache_memkv.proto.memkv.v1 import maintenance_pb2, maintenance_pb2_grpc
from lmcache_memkv.transport.tcp import Buffer
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import CLIENT_ID_LEN, INVALIDATING, MAX_KEY_LEN, ErrorCode, Status

_OK = Status.OK  # hoisted: an enum member is an attribute lookup, and these compare per key
log = logging.getLogger("memkv.cluster")
R = TypeVar("R")
T = TypeVar("T")
_Groups = dict[tuple[str, ...], list[int]]  # candidate nodes, in order -> indexes of the keys that share them
_CHUNK = 512  # keys per request: under the nodes' default batch and meta limits
# How long past a deadline a caller waits for a node call already running: its own I/O ends at
# the same deadline (socket timeouts), so this only covers thread scheduling on a busy host.
_GRACE_S = 0.25
_HOUSEKEEPING_S = 0.2
# Degraded start: retry the first view after 0.5 s, doubling up to 5 s (cheap: one MemberList).
_CONNECT_BACKOFF_MIN_S = 0.5
_CONNECT_BACKOFF_MAX_S = 5.0
_CURSOR_PREFIX = "v2."
_MAX_LIST_PAGE = 10_000
_NOT_READY_PAUSE_S = 0.05  # a node's default --max-list-limit (wire.limits.Limits.max_list_limit)


class _OutOfTime(MemKVTimeout):
    """A call's deadline passed before a node was asked."""


class _NodeBusy(_OutOfTime):
    """A node call was still queued on the node's lane when its deadline came (the lane's
    threads all held by slower calls): a miss for that node alone, not a fault of the node."""


def _left(deadline: float) -> float:
    """Seconds left before ``deadline``, for the next node request."""
    remaining = deadline - time.monotonic()
    if remaining < 0.001:
        raise _OutOfTime("the call's deadline passed")
    return remaining


def _chunks(n: int) -> list[range]:
    return [range(i, min(n, i + _CHUNK)) for i in range(0, n, _CHUNK)]


def _check_count(node_id: str, what: str, got: Sequence[object], want: int) -> None:
    """Whatever moves the bytes, a node's answer has one entry per key asked, or it is refused."""
    if len(got) != want:
        raise ProtocolError(f"memkv node {node_id}: {what} of {want} got {len(got)} answers")


def _answered(result: list[T | None] | Exception, out: list[T | None], n: int) -> list[T | None] | Exception:
    """A node's answers for ``n`` keys: all of them, or after a failure the chunks it did answer
    (``out``), the rest as misses, so they fail over like any miss."""
    if not isinstance(result, Exception) or not out:
        return result
    return out + [None] * (n - len(out))


def _encode_cursor(key: bytes) -> str:
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(key).decode()


def _decode_cursor(cursor: str) -> bytes:
    """The key a cursor names; anything this client did not issue is a ValueError, never a
    silent restart from the first page."""
    if not cursor.startswith(_CURSOR_PREFIX):
        raise ValueError(f"list_keys: not a cursor this client issued: {cursor[:40]!r}")
    body = cursor[len(_CURSOR_PREFIX) :]
    try:
        key = base64.b64decode(body, altchars=b"-_", validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"list_keys: malformed cursor {cursor[:40]!r}") from None
    if not 0 < len(key) <= MAX_KEY_LEN or _encode_cursor(key) != cursor:
        raise ValueError(f"list_keys: malformed cursor {cursor[:40]!r}")
    return key


class ClusterClient:
    def __init__(
        self,
        servers: Sequence[str],
        key: bytes | None = None,
        replicas: int = 1,
        timeout_s: float = 5.0,
        tls_ca: str | None = None,
        on_node_error: Callable[[str, str], None] | None = None,
        cluster_id: str | None = None,
        data_client_factory: DataClientFactory | None = None,
        threads_per_node: int = DEFAULT_THREADS_PER_NODE,
        member_client_factory: Callable[[Member, bytes | None, float, bytes], DataClient] | None = None,
    ) -> None:
        """``on_node_error(node_id, kind)`` hears of every failed node call (kind: timeout,
        connect, protocol, server, or busy: queued behind that node's other calls until the
        deadline) — the adapter counts them in its metrics. ``cluster_id``: refuse nodes naming
        another cluster (None: pin the first id a node names). ``data_client_factory`` makes the
        client for one node (``NodeClient`` over TCP by default). ``threads_per_node`` bounds
        the threads one node's calls may hold, so a frozen node cannot starve the others.
        ``member_client_factory``, when given, is asked instead with the whole member record (its
        control endpoint and transports: how the RDMA client sets up its session)."""
        self._on_node_error = on_node_error
        self.servers = [s.strip() for s in servers if s and s.strip()]
        if not self.servers:
            raise ConfigError('servers: no control endpoint given; set MEMKV_SERVERS or the adapter\'s "servers" field')
        for endpoint in self.servers:
            try:
                parse_endpoint(endpoint, field="servers")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if replicas < 1:
            raise ConfigError(f"replicas must be at least 1, got {replicas}")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
        if threads_per_node < 1:
            raise ConfigError(f"threads_per_node must be at least 1, got {threads_per_node}")
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.client_id = os.urandom(CLIENT_ID_LEN)  # owns this client's leases on every node
        self._key = key
        self._pool = ChannelPool(key, tls_ca or ca_from_env())
        self._view = ClusterView()  # replaced whole, so readers need no lock
        self._view_lock = threading.Lock()
        self._new_client: DataClientFactory = data_client_factory or TCP_CLIENT
        self._member_client = member_client_factory
        self._nodes: dict[str, tuple[int, str, DataClient]] = {}  # node_id -> (incarnation, endpoint, client)
        self._nodes_lock = threading.Lock()
        self._suspicion = LocalSuspicion()
        self._leases = LeaseBook()
        self._owed = ReleaseQueue()
        self._lanes = NodeLanes(threads_per_node)
        self._watcher: ViewWatcher | None = None
        self._housekeeper: threading.Thread | None = None
        self._connector: threading.Thread | None = None
        # Configured server -> the control endpoint it turned out to be (a data port given, MinIO
        # style, is its port + 1); filled by fetch_view, read by the watcher's fallback list.
        self._control: dict[str, str] = {}
        self._stop = threading.Event()
        self._closed = False
        self._cluster = ClusterIdentity(cluster_id)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Fetch the view from the first server that answers, then keep it current in the background."""
        if self._watcher is not None:
            return
        epoch, members, source = fetch_view(self._pool, self.servers, self.timeout_s, self._control, self._cluster)
        self._adopt_first_view(epoch, members, source)

    def start_in_background(self, on_connected: Callable[[str], None] | None = None) -> None:
        """Keep trying ``start`` in a background thread (exponential back-off with jitter, capped)
        until a server answers; meanwhile the view is empty, so every call is a miss or a failed
        write. ``on_connected(endpoint)`` runs once the first view is in."""
        if self._watcher is not None or self._connector is not None:
            return
        self._connector = threading.Thread(
            target=self._connect_loop, args=(on_connected,), name="memkv-cluster-connect", daemon=True
        )
        self._connector.start()

    def _connect_loop(self, on_connected: Callable[[str], None] | None) -> None:
        delay = _CONNECT_BACKOFF_MIN_S
        while not self._stop.is_set():
            # Full jitter: sidecars restarted together must not retry in lockstep.
            if self._stop.wait(random.uniform(delay / 2, delay)):
                return
            try:
                epoch, members, source = fetch_view(self._pool, self.servers, self.timeout_s, self._control, self._cluster)
            except ConnectError as exc:
                log.debug("memkv cluster still unreachable: %s", exc)
                delay = min(delay * 2, _CONNECT_BACKOFF_MAX_S)
                continue
            except RuntimeError:  # the pool was closed under us: close() is under way
                return
            with self._view_lock:
                if self._closed:
                    return
            self._adopt_first_view(epoch, members, source)
            if on_connected is not None:
                on_connected(source)
            return

    def _adopt_first_view(self, epoch: int, members: list[Member], source: str) -> None:
        # The watcher merges every view record by record into its table, this first one too.
        watcher = ViewWatcher(self._pool, self._watch_order, self._apply, self._cluster)
        watcher.adopt(epoch, members)
        log.info("memkv cluster view from %s: epoch %d, %d members", source, epoch, len(members))
        self._watcher = watcher
        watcher.start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="memkv-cluster-housekeeping", daemon=True)
        self._housekeeper.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._connector is not None:
            self._connector.join(timeout=self.timeout_s + 1)
        if self._watcher is not None:
            self._watcher.stop()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout=self.timeout_s)
        self._lanes.close()
        with self._nodes_lock:
            clients, self._nodes = [c for _, _, c in self._nodes.values()], {}
        for client in clients:
            client.close()
        self._pool.close()

    # ------------------------------------------------------------------ view

    @property
    def epoch(self) -> int:
        return self._view.epoch

    def members(self) -> list[Member]:
        return list(self._view.members.values())

    def placement(self, key: bytes) -> list[str]:
        return self._view.placement(key)

    def _apply(self, epoch: int, members: list[Member]) -> None:
        """Adopt a view. The client's epoch never goes back, even when the new view comes from
        a member whose own counter is behind: it then counts one past the last epoch held."""
        with self._view_lock:
            old = self._view
            if epoch > old.epoch:
                new_epoch = epoch
            elif not old.same_membership(members):
                new_epoch = old.epoch + 1
            else:
                new_epoch = old.epoch
            self._view = view = ClusterView.build(new_epoch, members)
        stale = []
        with self._nodes_lock:
            for node_id, (inc, endpoint, client) in list(self._nodes.items()):
                m = view.members.get(node_id)
                if (
                    m is None
                    or m.state in (State.DEAD, State.LEFT)
                    or m.incarnation != inc
                    or m.data_endpoint != endpoint
                ):
                    stale.append(client)
                    del self._nodes[node_id]
        for client in stale:  # pooled connections to an earlier life would fail once each
            client.close()

    def _watch_order(self, failed: str | None) -> list[str]:
        """Whom to watch: the ALIVE members in random order (sidecars sharing one MEMKV_SERVERS
        list must not all watch its first entry), then the configured servers, the failed one last."""
        alive = [m.control_endpoint for m in self._view.members.values() if m.state is State.ALIVE]
        random.shuffle(alive)
        order: list[str] = []
        # Configured servers as control endpoints (a data port probed now if not yet known).
        for endpoint in [*alive, *control_endpoints(self.servers, self._control)]:
            if endpoint not in order and endpoint != failed:
                order.append(endpoint)
        if failed is not None:
            order.append(failed)
        return order

    # ------------------------------------------------------------------ node calls

    def _node(self, m: Member) -> DataClient:
        with self._nodes_lock:
            entry = self._nodes.get(m.node_id)
            if entry is not None and entry[0] == m.incarnation and entry[1] == m.data_endpoint:
                return entry[2]
            if self._member_client is not None:
                client = self._member_client(m, self._key, self.timeout_s, self.client_id)
            else:
                client = self._new_client(m.data_endpoint, self._key, self.timeout_s, self.client_id)
            self._nodes[m.node_id] = (m.incarnation, m.data_endpoint, client)
        if entry is not None:
            entry[2].close()
        return client

    def _healthy_set(self, view: ClusterView) -> frozenset[str]:
        """The placeable (ALIVE or SUSPECT) nodes not in local back-off: once per call, not per key."""
        return frozenset(n for n in view.placeable if self._suspicion.healthy(n, view.members[n].incarnation))

    def _replica_groups(self, view: ClusterView, keys: Sequence[bytes]) -> _Groups:
        """The keys grouped by replica set: the top ``replicas`` of the healthy placeable nodes
        (where reads look), best first. Keys with no healthy replica are in no group."""
        healthy = self._healthy_set(view)
        if len(view.placeable) == 1:  # one node: every key's replica set, without hashing a key
            return {tuple(healthy): list(range(len(keys)))} if healthy and keys else {}
        r = self.replicas
        groups: _Groups = {}
        if len(healthy) == len(view.placeable):  # the common case: rank only, no filtering
            for i, key in enumerate(keys):
                groups.setdefault(tuple(view.placement(key)[:r]), []).append(i)
            return groups
        for i, key in enumerate(keys):
            replicas = tuple([n for n in view.placement(key) if n in healthy][:r])
            if replicas:
                groups.setdefault(replicas, []).append(i)
        return groups

    def _call(self, view: ClusterView, node_id: str, op: Callable[[DataClient], R]) -> R | Exception:
        """Run ``op`` on one node; on failure mark the node and return the error instead of raising."""
        m = view.members[node_id]
        try:
            try:
                return op(self._node(m))
            except ServerError as exc:
                if exc.code != ErrorCode.FENCED:
                    raise
                # The node dropped its data (it may have been declared DEAD) and refused a
                # connection of its old life; a fresh connection reaches the new one. ``op``
                # starts over: answers from the old life say nothing about the new one.
                return op(self._node(m))
        except _OutOfTime as exc:
            return exc  # the call's own deadline ran out (e.g. queued behind others): not the node's fault
        except (MemKVError, OSError) as exc:
            if isinstance(exc, ServerError) and exc.code == ErrorCode.LIMIT:
                return exc  # the request was too big for the node: not the node's fault
            if self._on_node_error is not None:
                kind = (
                    "timeout" if isinstance(exc, TimeoutError)
                    else "server" if isinstance(exc, ServerError)
                    else "protocol" if isinstance(exc, ProtocolError)
                    else "connect"
                )
                self._on_node_error(node_id, kind)
            if self._suspicion.mark(node_id, m.incarnation):
                log.warning("memkv node %s failed (%s); skipping it for %.1fs", node_id, exc, self._suspicion.backoff_s)
            return exc

    def _fanout(
        self,
        tasks: Mapping[str, Callable[[], R]],
        deadline: float,
        late: Callable[[str, R], None] | None = None,
    ) -> dict[str, R | Exception]:
        """Run one task per node, in parallel; tasks return their error rather than raise.

        Every task runs in a slot of its node's lane (``lanes.py``): the first whose node has a
        slot free right now runs on this thread, the others on their lanes' threads. Waits until
        ``deadline`` plus ``_GRACE_S`` at most. A task still queued at the deadline is cancelled
        (``_NodeBusy`` for its node alone, as is one that found no slot); one still running past
        the grace answers a timeout, and ``late`` gets its result when it ends (to give back
        leases it took).
        """
        if self._closed:
            raise ConnectError("ClusterClient is closed")
        futures: dict[str, Future[R]] = {}
        here: tuple[str, Callable[[], R], threading.BoundedSemaphore] | None = None
        out: dict[str, R | Exception] = {}
        try:
            for node_id, task in tasks.items():
                if here is None and (slot := self._lanes.slot_here(node_id)) is not None:
                    here = (node_id, task, slot)
                else:
                    futures[node_id] = self._lanes.submit(node_id, task, deadline)
        except RuntimeError:  # closed under us
            for future in futures.values():
                future.cancel()
            if here is not None:
                here[2].release()
            raise ConnectError("ClusterClient is closed") from None
        if here is not None:
            try:
                out[here[0]] = here[1]()
            finally:
                here[2].release()
        if not futures:
            return out
        _, running = wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        if running:
            # Work that has not started by the deadline never will (its node's lane is held by
            # slower calls): cancel it now; give the calls under way the grace to end.
            started = [f for f in running if not f.cancel()]  # cancel fails once a task has started
            if started:
                wait(started, timeout=max(0.0, deadline + _GRACE_S - time.monotonic()))
        for node_id, future in futures.items():
            if future.done() and not future.cancelled():
                if isinstance(future.exception(), LaneBusy):
                    out[node_id] = self._busy(node_id)
                else:
                    out[node_id] = future.result()  # tasks return their errors; anything else is a bug
            elif future.cancelled() or future.cancel():
                out[node_id] = self._busy(node_id)
            else:
                out[node_id] = MemKVTimeout(f"memkv node {node_id}: call still running {_GRACE_S}s past its deadline")
                # The caller may reuse its buffers as soon as we return, and the running call's
                # own fence waits on its (possibly starved) lane thread: fence it from here.
                self._abort_transfers(node_id)
                if late is not None:
                    future.add_done_callback(partial(self._late, node_id, late))
        return out

    def _abort_transfers(self, node_id: str) -> None:
        with self._nodes_lock:
            entry = self._nodes.get(node_id)
        abort = getattr(entry[2], "abort_transfers", None) if entry is not None else None
        if abort is None:
            return
        try:
            abort()
        except Exception:  # the call itself will fail and fence; nothing more we can do here
            log.exception("memkv node %s: aborting the transfers of a call past its deadline failed", node_id)

    def _busy(self, node_id: str) -> _NodeBusy:
        if self._on_node_error is not None:
            self._on_node_error(node_id, "busy")
        log.debug("memkv node %s: call still queued at its deadline (its lane is full)", node_id)
        return _NodeBusy(f"memkv node {node_id}: call still queued behind that node's others at its deadline")

    @staticmethod
    def _late(node_id: str, late: Callable[[str, R], None], future: Future[R]) -> None:
        """A task's result that came after its caller stopped waiting."""
        if future.cancelled() or future.exception() is not None:
            return
        try:
            late(node_id, future.result())
        except Exception:  # a callback on a lane thread: nobody else would see it
            log.exception("memkv: handling a late answer from %s failed", node_id)

    def _check_keys(self, keys: Sequence[bytes]) -> None:
        if keys and not 0 < min(map(len, keys)) <= max(map(len, keys)) <= MAX_KEY_LEN:
            bad = next(len(k) for k in keys if not 0 < len(k) <= MAX_KEY_LEN)
            raise ValueError(f"keys must be 1-{MAX_KEY_LEN} bytes, got {bad}")

    # ------------------------------------------------------------------ data operations

    def put(self, keys: Sequence[bytes], values: Sequence[Buffer]) -> list[bool]:
        """Write each key to its replica set; True where the write is acknowledged.

        A write is acknowledged only when every replica of the key's placement (its top
        ``replicas`` ALIVE or SUSPECT members) either stored this version or dropped the key's
        older value (NO_SPACE, TOO_LARGE), and at least one stored it. A replica that timed out,
        failed, is in local back-off or holds a newer version (STALE) leaves it unacknowledged:
        once a write is acknowledged, no replica still holds the value it replaced. A replica
        that failed part way counts for the chunks it answered before failing.
        """
        if len(keys) != len(values):
            raise ValueError(f"put: {len(keys)} keys but {len(values)} values")
        self._check_keys(keys)
        view = self._view
        deadline = time.monotonic() + self.timeout_s
        versions = CLOCK.next(len(keys))
        healthy = self._healthy_set(view)
        r = self.replicas
        need = [0] * len(keys)
        by_node: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            replicas = view.placement(key)[:r]
            need[i] = len(replicas)
            for node_id in replicas:
                if node_id in healthy:  # one in back-off is not asked, and so not acknowledged
                    by_node.setdefault(node_id, []).append(i)

        def put_on(node_id: str, idx: list[int]) -> Callable[[], list[Status | None] | Exception]:
            got: dict[int, Status] = {}  # key index -> this node's answer, chunk by chunk

            def op(client: DataClient) -> None:
                got.clear()
                sel = idx
                while True:
                    for part in _chunks(len(sel)):
                        chunk = [sel[j] for j in part]
                        statuses = client.put(
                            [keys[i] for i in chunk],
                            [values[i] for i in chunk],
                            timeout_s=_left(deadline),
                            versions=[versions[i] for i in chunk],
                        )
                        _check_count(node_id, "PUT", statuses, len(chunk))
                        got.update(zip(chunk, statuses))
                    # NOT_READY: the node just started or wiped and its peers do not know yet
                    # (a heartbeat or so); it dropped any older value, so the same write may be
                    # sent again while the call's time lasts.
                    sel = [i for i in sel if got[i] == Status.NOT_READY]
                    if not sel or deadline - time.monotonic() < 2 * _NOT_READY_PAUSE_S:
                        return
                    time.sleep(_NOT_READY_PAUSE_S)

            def task() -> list[Status | None] | Exception:
                result = self._call(view, node_id, op)
                if isinstance(result, Exception) and not got:
                    return result
                return [got.get(i) for i in idx]  # None: not answered (the node failed first)

            return task

        stored = [0] * len(keys)
        settled = [0] * len(keys)
        results = self._fanout({n: put_on(n, idx) for n, idx in by_node.items()}, deadline)
        for node_id, result in results.items():
            if isinstance(result, Exception):
                continue
            for i, status in zip(by_node[node_id], result, strict=True):
                if status == _OK:
                    stored[i] += 1
                    settled[i] += 1
                elif status in INVALIDATING:
                    settled[i] += 1
        return [stored[i] > 0 and settled[i] == need[i] for i in range(len(keys))]

    def _rounds(
        self,
        n: int,
        groups: _Groups,
        run: Callable[[str, list[int], float], list[T | None] | Exception],  # (node, key indexes, deadline)
        late: Callable[[str, list[T | None] | Exception], None] | None = None,
    ) -> list[tuple[T, str] | None]:
        """Ask each key's candidates in turn until one has it: per key of ``n`` (what it answered,
        node) or None. ``groups``: candidate nodes, in order -> the indexes of the keys that have them.

        Each round sends every unresolved key to its next healthy candidate, one batch per node,
        nodes in parallel; misses and failed nodes move on to the next round. ``late`` gets the
        answers of a node that came after the round stopped waiting for them. Keys move group by
        group: a round costs a Python step per key only where answers are read.
        """
        view = self._view
        deadline = time.monotonic() + self.timeout_s
        found: list[tuple[T, str] | None] = [None] * n
        pending = [(cands, idx, 0) for cands, idx in groups.items() if cands and idx]
        while pending and time.monotonic() < deadline:
            by_node: dict[str, list[int]] = {}
            asked: list[tuple[tuple[str, ...], list[int], int]] = []
            healthy = self._healthy_set(view)
            for cands, idx, cursor in pending:
                while cursor < len(cands) and cands[cursor] not in healthy:
                    cursor += 1
                if cursor < len(cands):
                    by_node.setdefault(cands[cursor], []).extend(idx)
                    asked.append((cands, idx, cursor + 1))
            if not by_node:
                break
            # Leave time for the fail-over rounds still possible: this round gets an equal share.
            rounds_left = 1 + max(len(cands) - cursor for cands, _, cursor in asked)
            now = time.monotonic()
            round_deadline = now + (deadline - now) / rounds_left
            tasks = {node: partial(run, node, idx, round_deadline) for node, idx in by_node.items()}
            for node_id, result in self._fanout(tasks, round_deadline, late).items():
                if isinstance(result, Exception):
                    continue
                for i, answer in zip(by_node[node_id], result, strict=True):
                    if answer is not None:
                        found[i] = (answer, node_id)
            pending = []
            for cands, idx, cursor in asked:
                if cursor < len(cands):
                    rest = [i for i in idx if found[i] is None]
                    if rest:
                        pending.append((cands, rest, cursor))
        return found

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Buffer], exact: bool = False) -> list[int | None]:
        """Read each key into its buffer from the first replica that has it; per key the length or None.

        A node this client holds a lease on for the key is asked first (the lease keeps it there).
        With ``exact`` only a value of exactly the buffer's size counts: a replica holding another
        size is skipped for the next one, and that copy alone (that node, that version) is purged.
        """
        if len(keys) != len(buffers):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        self._check_keys(keys)
        view = self._view
        groups = self._replica_groups(view, keys)
        if any(len(replicas) > 1 for replicas in groups):
            # A replica holding our lease is asked first; a lease on a node outside the replica
            # set (taken before a join or during a back-off) may pin a value since replaced.
            # (With one replica there is no order to change.)
            holders = self._leases.holders_many(keys)
            reordered: _Groups = {}
            for replicas, idx in groups.items():
                for i in idx:
                    held = [n for n in holders[i] if n in replicas]
                    cands = (*held, *(n for n in replicas if n not in held)) if held else replicas
                    reordered.setdefault(cands, []).append(i)
            groups = reordered
        wrong: dict[str, list[tuple[bytes, int]]] = {}  # node -> [(key, version)] of wrong-size copies
        wrong_lock = threading.Lock()

        def run(node_id: str, idx: list[int], deadline: float) -> list[int | None] | Exception:
            out: list[int | None] = []
            bad: list[tuple[bytes, int]] = []

            def op(client: DataClient) -> list[int | None]:
                out.clear()
                bad.clear()
                for part in _chunks(len(idx)):
                    sel = [idx[j] for j in part]
                    reply = client.read_into(
                        [keys[i] for i in sel], [buffers[i] for i in sel], timeout_s=_left(deadline), exact=exact
                    )
                    for column in (reply.statuses, reply.lengths, reply.versions):
                        _check_count(node_id, "GET", column, len(sel))
                    for i, status, length, version in zip(sel, reply.statuses, reply.lengths, reply.versions, strict=True):
                        out.append(length if status == _OK else None)
                        if status == Status.WRONG_SIZE:
                            bad.append((keys[i], version))
                return out

            result = self._call(view, node_id, op)
            if bad:
                with wrong_lock:
                    wrong.setdefault(node_id, []).extend(bad)
            return _answered(result, out, len(idx))

        found = self._rounds(len(keys), groups, run)
        if wrong and not self._closed:
            log.warning("memkv: purging %d stored values whose size does not match the reader's buffer",
                        sum(len(v) for v in wrong.values()))
            self._purge(view, wrong)
        return [None if f is None else f[0] for f in found]

    def _purge(self, view: ClusterView, copies: dict[str, list[tuple[bytes, int]]]) -> None:
        """Delete exactly these copies: on that node, up to that version (a newer good value stays).
        Queued on the nodes' lanes; nobody waits for it."""
        deadline = time.monotonic() + self.timeout_s
        for node_id, items in copies.items():
            if node_id not in view.members:
                continue

            def op(client: DataClient, items: list[tuple[bytes, int]] = items) -> None:
                for part in _chunks(len(items)):
                    chunk = items[part.start : part.stop]
                    client.delete_versions([k for k, _ in chunk], [v for _, v in chunk], timeout_s=_left(deadline))

            try:
                self._lanes.submit(node_id, partial(self._call, view, node_id, op), deadline)
            except RuntimeError:  # closing
                return

    def exists(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0) -> list[int | None]:
        """Per key its length if any replica has it; with ``lease_ttl_s`` the answering node leases it
        (a replica that has it but will not lease it, its budget spent, counts as a miss)."""
        self._check_keys(keys)
        view = self._view
        groups = self._replica_groups(view, keys)

        def run(node_id: str, idx: list[int], deadline: float) -> list[tuple[int, int] | None] | Exception:
            out: list[tuple[int, int] | None] = []

            def op(client: DataClient) -> list[tuple[int, int] | None]:
                out.clear()  # a retry after FENCED: the old life's leases went with its data
                for part in _chunks(len(idx)):
                    reply = client.lookup([keys[idx[j]] for j in part], lease_ttl_s, timeout_s=_left(deadline))
                    for column in (reply.statuses, reply.lengths, reply.lease_ids):
                        _check_count(node_id, "EXISTS", column, len(part))
                    out.extend(
                        (n, lease_id) if s == _OK else None
                        for s, n, lease_id in zip(reply.statuses, reply.lengths, reply.lease_ids, strict=True)
                    )
                return out

            # The chunks answered before a failure keep their answers, and so their leases are
            # recorded below and released in time, like any other.
            return _answered(self._call(view, node_id, op), out, len(idx))

        def late(node_id: str, result: list[tuple[int, int] | None] | Exception) -> None:
            # Answers nobody waited for: their leases are recorded nowhere, so give them back now
            # rather than let them hold this client's lease budget until their TTL.
            if isinstance(result, Exception) or node_id not in view.members:
                return
            inc = view.members[node_id].incarnation
            granted = [OwedRelease(a[1], node_id, inc) for a in result if a is not None and a[1]]
            if granted:
                self._owed.owe(granted, time.monotonic())

        found = self._rounds(len(keys), groups, run, late)
        if lease_ttl_s > 0:
            members = view.members
            until = time.monotonic() + lease_ttl_s
            self._leases.add_many(
                (
                    (key, (f[1], members[f[1]].incarnation), f[0][1])
                    for key, f in zip(keys, found)
                    if f is not None and f[0][1]
                ),
                until,
            )
        return [None if f is None else f[0][0] for f in found]

    def release(self, keys: Sequence[bytes]) -> None:
        """Return one lease per key, by id, to the node that granted it; failures are retried in the background."""
        view = self._view
        owed: dict[str, list[OwedRelease]] = {}
        for taken in self._leases.take_many(keys):
            if taken is None:
                continue
            (node_id, incarnation), lease_id = taken
            m = view.members.get(node_id)
            # A dead, departed or restarted node holds none of the leases it granted.
            if m is not None and m.state not in (State.DEAD, State.LEFT) and m.incarnation == incarnation:
                owed.setdefault(node_id, []).append(OwedRelease(lease_id, node_id, incarnation))
        self._release(view, owed)

    def _release(self, view: ClusterView, owed: dict[str, list[OwedRelease]]) -> None:
        deadline = time.monotonic() + self.timeout_s

        def release_on(node_id: str, items: list[OwedRelease]) -> list[bool] | Exception:
            out: list[bool] = []

            def op(client: DataClient) -> list[bool]:
                out.clear()
                for part in _chunks(len(items)):
                    got = client.release([items[j].lease_id for j in part], timeout_s=_left(deadline))
                    _check_count(node_id, "RELEASE", got, len(part))
                    out.extend(got)
                return out

            result = self._call(view, node_id, op)
            return out if isinstance(result, Exception) and out else result  # the chunks that landed

        tasks: dict[str, Callable[[], list[bool] | Exception]] = {}
        retry: list[OwedRelease] = []
        for node_id, items in owed.items():
            if self._suspicion.healthy(node_id, items[0].incarnation):
                tasks[node_id] = partial(release_on, node_id, items)
            else:
                retry += items
        for node_id, result in self._fanout(tasks, deadline).items():
            # Releases name lease ids, so retrying one that did land is harmless.
            landed = 0 if isinstance(result, Exception) else len(result)
            retry += owed[node_id][landed:]
        if retry and self._owed.owe(retry, time.monotonic()):
            log.warning("gave up releasing some leases after %d attempts (their TTL expires them)", MAX_ATTEMPTS)

    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        """Delete everywhere; True where the delete is durable: every member that is not DEAD or
        LEFT confirmed it (deleted, had nothing, or holds a newer write). Each node keeps a
        tombstone, so an older write arriving later cannot bring the key back. A member that
        failed part way confirmed the chunks it answered before failing."""
        self._check_keys(keys)
        view = self._view
        must = view.placeable
        healthy = self._healthy_set(view)
        nodes = [n for n in must if n in healthy]
        deadline = time.monotonic() + self.timeout_s
        versions = CLOCK.next(len(keys))

        def delete_on(node_id: str) -> list[Status] | Exception:
            out: list[Status] = []

            def op(client: DataClient) -> list[Status]:
                out.clear()
                for part in _chunks(len(keys)):
                    got = client.delete_versions(
                        [keys[i] for i in part], [versions[i] for i in part], timeout_s=_left(deadline)
                    )
                    _check_count(node_id, "DELETE", got, len(part))
                    out.extend(got)
                return out

            result = self._call(view, node_id, op)
            return out if isinstance(result, Exception) and out else result  # the chunks confirmed

        confirmed = [0] * len(keys)
        for result in self._fanout({n: partial(delete_on, n) for n in nodes}, deadline).values():
            if isinstance(result, Exception):
                continue
            for i, status in enumerate(result):
                # STALE: that node holds a newer write (or refused our version): not deleted there.
                if status != Status.STALE:
                    confirmed[i] += 1
        return [bool(must) and c == len(must) for c in confirmed]

    def list_keys(
        self, prefix: bytes = b"", cursor: str | None = None, limit: int = 1000
    ) -> tuple[list[tuple[bytes, int]], str | None]:
        """One page of (key, size) over all ALIVE nodes, sorted and deduplicated; the next cursor or None.

        Each node returns its first ``limit`` keys after the cursor; the page is the first ``limit``
        of their union, which is exactly the cluster's next ``limit`` keys.
        """
        if limit <= 0:
            raise ValueError(f"list_keys: limit must be positive, got {limit}")
        limit = min(limit, _MAX_LIST_PAGE)  # nodes refuse larger pages (their LIST limit)
        after = _decode_cursor(cursor) if cursor else b""
        view = self._view
        nodes = sorted(self._healthy_set(view))
        deadline = time.monotonic() + self.timeout_s

        def op(client: DataClient) -> tuple[list[tuple[bytes, int]], bytes]:
            return client.list_keys(prefix, after, limit, timeout_s=_left(deadline))

        merged: dict[bytes, int] = {}
        more = False
        results = self._fanout({n: partial(self._call, view, n, op) for n in nodes}, deadline)
        failed = [r for r in results.values() if isinstance(r, Exception)]
        if nodes and len(failed) == len(nodes):
            # An empty page would read as "no keys": say that nobody answered instead.
            raise ConnectError(f"list_keys: no node answered ({failed[0]})")
        for result in results.values():
            if isinstance(result, Exception):
                continue
            items, node_cursor = result
            more = more or bool(node_cursor)
            for key, size in items:
                merged.setdefault(key, size)
        page = sorted(merged.items())
        if len(page) > limit:
            page, more = page[:limit], True
        return page, (_encode_cursor(page[-1][0]) if more and page else None)

    # ------------------------------------------------------------------ status

    def node_stats(self) -> dict[str, dict[str, Any]]:
        """Per node id (of the members that answered, proving the key if one is set) its
        statistics from Maintenance.Status."""
        from lmcache_memkv.control.response_auth import STATUS, fresh_nonce

        view = self._view
        asked = []
        for m in view.members.values():
            if m.state in (State.ALIVE, State.SUSPECT):
                try:
                    stub = maintenance_pb2_grpc.MaintenanceStub(self._pool.get(m.control_endpoint))
                    request = maintenance_pb2.StatusRequest(nonce=fresh_nonce())
                    asked.append((m, request, stub.Status.future(request, timeout=self.timeout_s)))
                except RuntimeError:  # closed
                    return {}
        wait_all([f for _, _, f in asked], self.timeout_s)
        out: dict[str, dict[str, Any]] = {}
        for m, request, future in asked:
            try:
                reply: maintenance_pb2.StatusResponse = future.result(timeout=0)
                self._pool.check_reply(STATUS, request, reply)
            except (grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError) as exc:
                log.debug("stats of %s unavailable: %s", m.node_id, describe_rpc_error(exc))
                continue
            except ValueError as exc:  # ReplyRefused: not the node we hold the key for
                log.warning("stats of %s refused: %s", m.node_id, exc)
                continue
            out[m.node_id] = {
                **stats_dict(reply.stats),
                "node_id": m.node_id,
                "state": str(m.state),
                "incarnation": m.incarnation,
                "uptime_seconds": reply.uptime_seconds,
                "version": reply.version,
            }
        return out

    @property
    def connected(self) -> bool:
        """Whether a first view is in (False while a background start is still trying)."""
        return self._watcher is not None

    def reachable(self) -> int:
        """Placeable members not in local back-off: where a write could land right now."""
        return len(self._healthy_set(self._view))

    def health(self) -> dict[str, Any]:
        view = self._view
        watcher = self._watcher
        up = len(view.alive)
        return {
            "connected": watcher is not None,
            "placeable": len(view.placeable),
            "epoch": view.epoch,
            "members": len(view.members),
            "members_up": up,
            "members_down": len(view.members) - up,
            "states": {n: str(m.state) for n, m in view.members.items()},
            "suspected_locally": self._suspicion.suspected(),
            "watching": watcher.endpoint if watcher else None,
            "watch_silence_s": watcher.silence() if watcher else None,
            "replicas": self.replicas,
            "leases_held": self._leases.count(),
            "releases_owed": len(self._owed),
        }

    # ------------------------------------------------------------------ background

    def _housekeeping(self) -> None:
        while not self._stop.wait(_HOUSEKEEPING_S):
            try:
                if self._watcher is not None:
                    self._watcher.check_stale()
                self._leases.expire(time.monotonic())
                # Lanes of nodes no longer placeable go, with any threads a frozen node held.
                self._lanes.retire(frozenset(self._view.placeable))
                due = self._owed.due(time.monotonic())
                if due:
                    view = self._view
                    owed: dict[str, list[OwedRelease]] = {}
                    for node_id, items in due.items():
                        m = view.members.get(node_id)
                        if m is None or m.state in (State.DEAD, State.LEFT):
                            continue  # gone: its leases went with it
                        # A restarted node holds none of its earlier life's leases.
                        live = [i for i in items if i.incarnation == m.incarnation]
                        if live:
                            owed[node_id] = live
                    self._release(view, owed)
            except Exception:  # keep the housekeeping alive whatever one pass hits
                log.exception("cluster housekeeping failed")
