"""``MemKVL2Adapter``: LMCache's L2AdapterInterface over a MemKV cluster.

Registered as adapter type ``memkv`` at import. LMCache calls it from two controller
threads (store and prefetch); every call here only queues work and returns. Worker pools
move bytes straight between L1 pages (``MemoryObj.byte_array``) and the nodes, and signal
one event fd per completion kind. A dead node costs at most ``timeout_s`` and shows up as
misses or a failed store, never as a hang or an exception in LMCache's threads.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import EncodedObjectKey, KeyEntry, KeyListPage, ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import AdapterUsage, L2AdapterInterface, L2TaskId
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase, register_l2_adapter_type
from lmcache.v1.distributed.l2_adapters.factory import register_l2_adapter_factory
from lmcache.v1.platform import create_event_notifier

from lmcache_memkv.adapter.coalesce import Coalescer
from lmcache_memkv.adapter.keys import decode_key, encode_keys, model_prefix
from lmcache_memkv.adapter.metrics import AdapterMetrics, get_metrics
from lmcache_memkv.adapter.settings import FIELDS, AdapterSettings, resolve
from lmcache_memkv.errors import ConfigError, ConnectError, MemKVError

if TYPE_CHECKING:
    from lmcache.v1.distributed.api import MemoryLayoutDesc
    from lmcache.v1.distributed.internal_api import L1MemoryDesc
    from lmcache.v1.memory_management import MemoryObj

    from lmcache_memkv.client.rdma_client import TransportChooser
    from lmcache_memkv.cluster import ClusterClient

log = logging.getLogger("memkv.adapter")
TYPE_NAME = "memkv"
_USAGE_REFRESH_S = 5.0
_LOG_FORMAT = "[%(asctime)s] memkv %(levelname)s: %(message)s (%(filename)s:%(lineno)d:%(name)s)"


def _setup_logging(env: Mapping[str, str] | None = None) -> logging.Handler | None:
    """Make the ``memkv.*`` lines reach ``lmcache server``'s log: LMCache gives only its own
    loggers handlers, so without this our warnings (an unreachable cluster!) went nowhere.

    Level from MEMKV_LOG_LEVEL (default INFO). When the process already logs through the root
    logger, ours just propagate there (at the host's level unless MEMKV_LOG_LEVEL is set);
    otherwise a stderr handler in LMCache's layout is added and propagation stopped, so a root
    handler configured later cannot print every line twice. Returns the handler added, if any.
    """
    environ = os.environ if env is None else env
    logger = logging.getLogger("memkv")
    raw = environ.get("MEMKV_LOG_LEVEL", "").strip().upper()
    level = logging.getLevelName(raw or "INFO")
    if not isinstance(level, int):
        log.warning("MEMKV_LOG_LEVEL=%r is not a log level (DEBUG, INFO, WARNING, ERROR); using INFO", raw)
        level = logging.INFO
    if logger.handlers or logging.getLogger().handlers:
        if raw:
            logger.setLevel(level)
        return None
    logger.setLevel(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logger.addHandler(handler)
    logger.propagate = False
    return handler


class MemKVL2AdapterConfig(L2AdapterConfigBase):
    """Config of the ``memkv`` L2 adapter; see ``help()`` for the fields."""

    def __init__(self, settings: AdapterSettings) -> None:
        self.settings = settings

    @classmethod
    def from_dict(cls, d: dict) -> MemKVL2AdapterConfig:
        return cls(resolve(d))

    @classmethod
    def help(cls) -> str:
        return (
            "MemKV L2 adapter config fields (all optional when MEMKV_CONFIG or MEMKV_* supply them;\n"
            "precedence: defaults < MEMKV_CONFIG yaml < MEMKV_* env < these JSON fields):\n"
            "- servers (str|list): MemKV nodes HOST:PORT, comma-separated: control endpoints (:9901) or, as\n"
            "  MinIO's MEMKV_SERVERS, data endpoints (:9900; the control endpoint port+1 is found on its own);\n"
            "  any one suffices, the rest are found through the cluster view [MEMKV_SERVERS] (required)\n"
            "- prefix (str): namespace prefix for every key (default '') [MEMKV_PREFIX]\n"
            "- replicas (int 1..8): nodes each chunk is written to (default 1) [MEMKV_REPLICAS]\n"
            "- transport (auto|tcp|rdma): data plane (default auto). rdma: value bytes move by verbs\n"
            "  (the node RDMA-READs/WRITEs L1 pages), or the sidecar refuses to start, naming why; auto: verbs\n"
            "  to nodes that advertise rdma when this host has a usable device, else TCP [MEMKV_TRANSPORT]\n"
            "- num_workers (int 0..64): I/O threads per operation kind; 0: one per CPU this process may use,\n"
            "  2 to 4 (default 0) [MEMKV_NUM_WORKERS]\n"
            "- timeout_s (float): bound on every remote call; a dead node becomes misses after it\n"
            "  (default 5.0) [MEMKV_TIMEOUT_S]\n"
            "- lease_ttl_s (float): how long a lookup-and-lock lease protects a chunk if never unlocked\n"
            "  (default 30) [MEMKV_LEASE_TTL_S]\n"
            "- auth_key_file (str): file with the 64-hex shared key [or MEMKV_AUTH_KEY]\n"
            "- tls_ca (str): CA bundle for a TLS control plane [MEMKV_TLS_CA]\n"
            "- rdma_devices (str|list): RDMA devices to use, first that opens wins [MEMKV_RDMA_DEVICES]\n"
            "- rdma_port (int 1..255): device port (default 1) [MEMKV_RDMA_PORT]\n"
            "- rdma_gid_index (int 0..255): GID index, e.g. the RoCE v2 IPv4 one (default 0) [MEMKV_RDMA_GID_INDEX]\n"
            "- fail_fast (bool): refuse to start when no node answers, instead of starting degraded\n"
            "  (misses, failed stores) and connecting in the background (default false) [MEMKV_FAIL_FAST]\n"
            "- cluster_id (str): refuse nodes that name another cluster (default: trust the first cluster\n"
            "  id a node names) [MEMKV_CLUSTER_ID]\n"
            'Example: {"type": "memkv", "servers": "10.0.0.5:9901,10.0.0.6:9901", "replicas": 2}'
        )


class _Lookup(NamedTuple):
    tid: L2TaskId
    keys: list[ObjectKey]
    started: float


def _view(obj: MemoryObj) -> memoryview:
    """The L1 page itself, as bytes (no copy)."""
    return memoryview(obj.byte_array).cast("B")


class MemKVL2Adapter(L2AdapterInterface):
    def __init__(
        self,
        config: MemKVL2AdapterConfig,
        l1_memory_desc: L1MemoryDesc | None = None,
        cluster: ClusterClient | None = None,
    ) -> None:
        # Capacity is server-side (nodes evict LRU), so LMCache's global L2 eviction stays off.
        super().__init__(max_capacity_bytes=0)
        s = config.settings
        self._settings = s
        self._prefix = s.prefix
        self._m = get_metrics()
        # l1_memory_desc (the L1 pool's address range) is what the verbs data path registers once;
        # the TCP data plane reads and writes L1 pages through MemoryObj views and needs nothing from it.
        self._transport, self._transport_why, self._chooser = _choose_transport(s, l1_memory_desc, self._m)
        self._replicas_unmet = 0
        try:
            self._cluster = cluster if cluster is not None else _connect(s, self._m, self._chooser)
        except BaseException:
            if self._chooser is not None:
                self._chooser.close()
            raise

        self._store_efd = create_event_notifier()
        self._lookup_efd = create_event_notifier()
        self._load_efd = create_event_notifier()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._done_store: dict[L2TaskId, L2StoreResult] = {}
        self._done_lookup: dict[L2TaskId, Bitmap] = {}
        self._done_load: dict[L2TaskId, Bitmap] = {}
        self._inflight = 0
        self._closed = False
        self._efds_closed = False
        n = s.workers
        # Separate pools so a burst of stores never queues ahead of a prefetch.
        self._store_pool = ThreadPoolExecutor(n, thread_name_prefix="memkv-store")
        self._fetch_pool = ThreadPoolExecutor(n, thread_name_prefix="memkv-fetch")
        self._misc_pool = ThreadPoolExecutor(1, thread_name_prefix="memkv-misc")
        self._lookups: Coalescer[_Lookup] = Coalescer(self._run_lookups, "memkv-lookup", max_items=64)
        self._usage = AdapterUsage(0, 0)
        self._keys = 0
        self._usage_stop = threading.Event()
        self._usage_thread = threading.Thread(target=self._refresh_usage_loop, name="memkv-usage", daemon=True)
        self._usage_thread.start()
        log.info(
            "memkv adapter up%s: servers=%s transport=%s replicas=%d workers=%d",
            "" if self._connected() else " (degraded: no cluster yet, connecting in the background)",
            ",".join(s.servers), self._transport, s.replicas, n,
        )  # fmt: skip

    def _connected(self) -> bool:
        return bool(getattr(self._cluster, "connected", True))

    @property
    def cluster(self) -> ClusterClient:
        """The cluster client this adapter routes through (status tools read its view)."""
        return self._cluster

    # ------------------------------------------------------------------ event fds

    def get_store_event_fd(self) -> int:
        return int(self._store_efd.fileno())

    def get_lookup_and_lock_event_fd(self) -> int:
        return int(self._lookup_efd.fileno())

    def get_load_event_fd(self) -> int:
        return int(self._load_efd.fileno())

    # ------------------------------------------------------------------ helpers

    def _wire(self, keys: list[ObjectKey]) -> list[bytes]:
        return encode_keys(self._prefix, keys)

    def _next_id(self) -> L2TaskId:
        with self._lock:
            self._inflight += 1
            return next(self._ids)

    def _submit(self, pool: ThreadPoolExecutor, fn: Callable[..., None], *args: Any) -> None:
        try:
            pool.submit(fn, *args)
        except RuntimeError:  # pool shut down: close() is under way; answer right here
            fn(*args)

    def _tell_listeners(self, notify: Callable[..., None], *args: Any) -> None:
        """LMCache's listeners and event bus (base-class helpers); a failing listener must not
        keep the task from completing."""
        try:
            notify(*args)
        except Exception:
            log.exception("an LMCache listener failed")

    def _signal(self, efd: Any) -> None:
        with self._lock:
            if self._efds_closed:
                return  # close() is done; nobody waits on this fd any more
            try:
                efd.notify()
            except OSError as exc:
                log.warning("memkv: cannot signal LMCache: %s", exc)

    def _finish(self, op: str, started: float) -> None:
        with self._lock:
            self._inflight -= 1
        self._m.latency.labels(op).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ store

    def submit_store_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        tid = self._next_id()
        self._submit(self._store_pool, self._run_store, tid, keys, objects, time.perf_counter())
        return tid

    def _run_store(self, tid: L2TaskId, keys: list[ObjectKey], objects: list[MemoryObj], started: float) -> None:
        oks = [False] * len(keys)
        sizes = [0] * len(keys)
        outcome = "error"
        try:
            views = [_view(o) for o in objects]
            sizes = [v.nbytes for v in views]
            if self._closed:
                outcome = "closed"  # close() is under way: fail fast, no network call
            else:
                oks = self._cluster.put(self._wire(keys), views) if keys else []
                outcome = _store_outcome(oks, self._reachable())
        except MemKVError as exc:
            log.warning("memkv store of %d keys failed: %s", len(keys), exc)
            outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
        except Exception:
            log.exception("memkv store task failed")
        stored = [k for k, ok in zip(keys, oks) if ok]
        stored_sizes = [n for n, ok in zip(sizes, oks) if ok]
        moved = sum(stored_sizes)
        with self._lock:
            self._done_store[tid] = L2StoreResult(outcome == "ok", moved)
        self._m.ops.labels("store", outcome).inc()
        self._m.keys.labels("store", "stored").inc(len(stored))
        if len(stored) < len(keys):
            self._m.keys.labels("store", "failed").inc(len(keys) - len(stored))
        self._m.bytes.labels("store", self._transport).inc(moved)
        if stored:
            self._tell_listeners(self._notify_keys_stored, stored, stored_sizes)
        self._finish("store", started)
        self._signal(self._store_efd)

    def _reachable(self) -> int:
        """Nodes a write could land on now (after the call: a node that just failed is in back-off)."""
        reachable = getattr(self._cluster, "reachable", None)
        return int(reachable()) if reachable is not None else 1

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        with self._lock:
            done, self._done_store = self._done_store, {}
        return done

    # ------------------------------------------------------------------ lookup and lock

    def submit_lookup_and_lock_task(self, keys: list[ObjectKey], group_layout_descs: dict[int, MemoryLayoutDesc]) -> L2TaskId:
        tid = self._next_id()
        task = _Lookup(tid, keys, time.perf_counter())
        if not self._lookups.submit(task):
            self._run_lookups([task])  # closing: answer (misses) right here
        return tid

    def _run_lookups(self, tasks: list[_Lookup]) -> None:
        """Every lookup queued while the previous one was in flight, in one cluster call."""
        total = sum(len(t.keys) for t in tasks)
        lengths: list[int | None] = [None] * total
        outcome = "ok"
        try:
            wire = [w for t in tasks for w in self._wire(t.keys)]
            if wire and not self._closed:
                lengths = self._cluster.exists(wire, self._settings.lease_ttl_s)
        except MemKVError as exc:
            log.warning("memkv lookup of %d keys failed (answering misses): %s", total, exc)
            outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
        except Exception:
            log.exception("memkv lookup failed")
            outcome = "error"
        at = 0
        hits = 0
        for task in tasks:
            n = len(task.keys)
            bitmap = Bitmap(n)
            found = [i for i, length in enumerate(lengths[at : at + n]) if length is not None]
            bitmap.batched_set(found)
            at += n
            hits += len(found)
            with self._lock:
                self._done_lookup[task.tid] = bitmap
            self._finish("lookup", task.started)
        self._m.ops.labels("lookup", outcome).inc(len(tasks))
        self._m.keys.labels("lookup", "hit").inc(hits)
        self._m.keys.labels("lookup", "miss").inc(total - hits)
        self._signal(self._lookup_efd)

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._done_lookup.pop(task_id, None)

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        # The cluster client knows which leases this process holds and where: keys it holds
        # none for (or holds fewer times than asked) cost nothing.
        if keys:
            self._submit(self._misc_pool, self._run_unlock, keys)

    def _run_unlock(self, keys: list[ObjectKey]) -> None:
        # The cluster client retries until the release lands (bounded); the TTL is the backstop.
        if self._closed:
            return
        try:
            self._cluster.release(self._wire(keys))
            self._m.ops.labels("unlock", "ok").inc()
        except Exception as exc:
            log.warning("memkv unlock of %d keys failed (leases expire after %.0fs): %s", len(keys), self._settings.lease_ttl_s, exc)
            self._m.ops.labels("unlock", "error").inc()

    # ------------------------------------------------------------------ load

    def submit_load_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        tid = self._next_id()
        self._submit(self._fetch_pool, self._run_load, tid, keys, objects, time.perf_counter())
        return tid

    def _run_load(self, tid: L2TaskId, keys: list[ObjectKey], objects: list[MemoryObj], started: float) -> None:
        bitmap = Bitmap(len(keys))
        loaded: list[ObjectKey] = []
        moved = 0
        outcome = "ok"
        try:
            views = [_view(o) for o in objects]
            wire = self._wire(keys)
            # Exact: a stored value of another size is skipped for the next replica and that copy
            # purged by the cluster client (full-length-or-miss, and good replicas stay).
            lengths = self._cluster.get_into(wire, views, exact=True) if keys and not self._closed else [None] * len(keys)
            for i, (n, view) in enumerate(zip(lengths, views)):
                if n is None or n != view.nbytes:
                    continue
                bitmap.set(i)
                loaded.append(keys[i])
                moved += n
            if len(loaded) < len(keys):
                outcome = "partial"
        except MemKVError as exc:
            log.warning("memkv load of %d keys failed (answering misses): %s", len(keys), exc)
            outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
        except Exception:
            log.exception("memkv load task failed")
            outcome = "error"
        with self._lock:
            self._done_load[tid] = bitmap
        self._m.ops.labels("load", outcome).inc()
        self._m.keys.labels("load", "hit").inc(len(loaded))
        self._m.keys.labels("load", "miss").inc(len(keys) - len(loaded))
        self._m.bytes.labels("load", self._transport).inc(moved)
        if loaded:
            self._tell_listeners(self._notify_keys_accessed, loaded)
        self._finish("load", started)
        self._signal(self._load_efd)

    def query_load_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._done_load.pop(task_id, None)

    # ------------------------------------------------------------------ delete, list, usage, status

    def delete(self, keys: list[ObjectKey]) -> None:
        if not keys:
            return
        try:
            deleted = self._cluster.delete(self._wire(keys))
        except MemKVError as exc:
            log.warning("memkv delete of %d keys failed: %s", len(keys), exc)
            self._m.ops.labels("delete", "error").inc()
            return
        gone = [k for k, ok in zip(keys, deleted) if ok]
        self._m.ops.labels("delete", "ok").inc()
        if gone:
            # Sizes are not tracked client-side (usage comes from the nodes, see get_usage).
            self._tell_listeners(self._notify_keys_deleted, gone, [0] * len(gone))

    def list_l2_keys(self, model_name: str | None = None, page_size: int = 500, cursor: str | None = None) -> KeyListPage:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        prefix = model_prefix(self._prefix, model_name) if model_name else self._prefix.encode()
        items, next_cursor = self._cluster.list_keys(prefix, cursor, page_size)
        entries = []
        for wire, size in items:
            f = decode_key(self._prefix, wire)
            if f is None:
                continue  # digested or foreign key: not listable
            enc = EncodedObjectKey(f.chunk_hash.hex(), f.model_name, f.kv_rank, f.object_group_id, f.cache_salt)
            entries.append(KeyEntry(key=enc, size_bytes=size))
        return KeyListPage(entries=tuple(entries), next_page_token=next_cursor)

    def get_usage(self) -> AdapterUsage:
        """The cluster's own occupancy (value bytes / arena capacity over ALIVE nodes).

        Nodes evict LRU on their own, so a client-side tally of stores would only grow;
        this reports what the nodes hold, refreshed in the background every few seconds.
        """
        return self._usage

    def _refresh_usage_loop(self) -> None:
        while not self._usage_stop.is_set():
            try:
                self._usage = self._read_usage()
                self._m.view_epoch.set(self._cluster.epoch)
                self._m.leases_held.set(self._cluster.health().get("leases_held", 0))
                states: Counter[str] = Counter(m.state for m in self._cluster.members())
                for state in ("ALIVE", "SUSPECT", "DEAD", "LEFT"):
                    self._m.members.labels(state).set(states.get(state, 0))
                self._m.connected.set(1 if self._connected() else 0)
                self._check_replicas(states.get("ALIVE", 0) + states.get("SUSPECT", 0))
            except Exception as exc:
                log.debug("usage refresh failed: %s", exc)
            self._usage_stop.wait(_USAGE_REFRESH_S)

    def _check_replicas(self, placeable: int) -> None:
        """Gauge and warn (once per change) when ``replicas`` exceeds the members in placement:
        every chunk then has fewer copies than configured."""
        want = self._settings.replicas
        unmet = max(0, want - placeable) if self._connected() else 0
        self._m.replicas_unmet.set(unmet)
        if unmet == self._replicas_unmet:
            return
        self._replicas_unmet = unmet
        if unmet:
            log.warning(
                "memkv: replicas=%d but only %d member(s) in placement: each chunk is written to %d node(s) "
                "until more nodes join (memkv_l2_replicas_unmet=%d)",
                want, placeable, placeable, unmet,
            )  # fmt: skip
        else:
            log.info("memkv: %d members in placement again; replicas=%d met", placeable, want)

    def _read_usage(self) -> AdapterUsage:
        stats = self._cluster.node_stats()
        used = sum(int(s.get("value_bytes", s.get("used_bytes", 0))) for s in stats.values())
        cap = sum(int(s.get("capacity_bytes", 0)) for s in stats.values())
        self._keys = sum(int(s.get("keys", 0)) for s in stats.values())
        return AdapterUsage(total_bytes_used=used, total_capacity_bytes=cap, bytes_by_cache_salt=MappingProxyType({}))

    def report_status(self) -> dict:
        """Status for ``lmcache describe`` and ``/status``; reads only local state (never blocks)."""
        health = dict(self._cluster.health())
        members = self._cluster.members()
        up = sum(1 for m in members if m.state == "ALIVE")
        epoch = self._cluster.epoch
        with self._lock:
            inflight = self._inflight
        usage = self._usage
        servers = ",".join(self._settings.servers)
        return {
            "is_healthy": up > 0,
            "degraded": not self._connected(),
            "type": TYPE_NAME,
            # ``lmcache describe`` prints "backend", the object count and used/capacity: say it all there.
            "backend": f"memkv over {self._transport}; servers {servers}; "
            f"{'DEGRADED (no node answered yet, retrying); ' if not self._connected() else ''}view epoch {epoch}; "
            f"members {up} up / {len(members) - up} down; replicas {self._settings.replicas}",
            "stored_object_count": self._keys,
            "max_capacity_bytes": usage.total_capacity_bytes,
            "current_size_bytes": usage.total_bytes_used,
            "servers": list(self._settings.servers),
            "transport": self._transport,
            "transport_reason": self._transport_why,
            "replicas": self._settings.replicas,
            "replicas_unmet": self._replicas_unmet,
            "prefix": self._prefix,
            "view_epoch": epoch,
            "members_up": up,
            "members_down": len(members) - up,
            "members": {m.node_id: str(m.state) for m in members},
            "leases_held": health.get("leases_held", 0),
            "tasks_in_flight": inflight,
            "used_bytes": usage.total_bytes_used,
            "capacity_bytes": usage.total_capacity_bytes,
            "timeout_s": self._settings.timeout_s,
            "health": health,
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._usage_stop.set()
        self._lookups.close(self._settings.timeout_s * 2)
        for pool in (self._store_pool, self._fetch_pool, self._misc_pool):
            pool.shutdown(wait=True, cancel_futures=False)
        self._usage_thread.join(timeout=self._settings.timeout_s)
        self._cluster.close()
        if self._chooser is not None:
            self._chooser.close()  # after the cluster client: its data clients use the device
        with self._lock:
            self._efds_closed = True
            for efd in (self._store_efd, self._lookup_efd, self._load_efd):
                efd.close()


def _choose_transport(
    s: AdapterSettings, l1: L1MemoryDesc | None, metrics: AdapterMetrics
) -> tuple[str, str, TransportChooser | None]:
    """The data plane (tcp or rdma), why, and for rdma the client factory holding the verbs side.

    ``rdma`` uses verbs or raises ConfigError naming what is missing: asking for RDMA must never
    silently mean something else. ``auto`` uses verbs when this host can (device, pyverbs, an L1
    pool to register) and then talks verbs to the nodes that advertise "rdma", TCP to the rest.
    """
    if s.transport == "tcp":
        return "tcp", "transport tcp configured", None
    from lmcache_memkv.client.rdma_client import RdmaSide, TransportChooser
    from lmcache_memkv.control.channel import ChannelPool
    from lmcache_memkv.control.tls import ca_from_env
    from lmcache_memkv.transport.rdma import RdmaError, rdma_devices

    required = s.transport == "rdma"
    devices = rdma_devices(s.rdma_devices)
    problem = ""
    if not devices:
        wanted = f" among {', '.join(s.rdma_devices)}" if s.rdma_devices else ""
        problem = f"this host has no usable RDMA device{wanted} (ibv_devices lists none, or pyverbs cannot be imported)"
    elif l1 is None or not l1.ptr or not l1.size:
        problem = "LMCache passed no L1 memory descriptor to register (L1MemoryDesc ptr/size)"
    side = None
    if not problem:
        errors = []
        for name in devices:
            try:
                side = RdmaSide(name, s.rdma_port, s.rdma_gid_index, int(l1.ptr), int(l1.size))  # type: ignore[union-attr]
                break
            except RdmaError as exc:
                errors.append(str(exc))
        if side is None:
            problem = "; ".join(errors)
    if side is None:
        if required:
            raise ConfigError(f"memkv adapter: 'transport' is 'rdma' but {problem}; use 'auto' or 'tcp'")
        return "tcp", f"auto: TCP because {problem}", None
    wire = metrics.wire_bytes
    chooser = TransportChooser(
        side, ChannelPool(s.auth_key, s.tls_ca or ca_from_env()), required, lambda t, d, n: wire.labels(t, d).inc(n)
    )
    d = side.device
    why = f"{s.transport}: verbs on {d.name} port {d.port} GID index {d.gid_index}, L1 pool of {side.region.length} bytes registered"
    if not required:
        why += " (nodes that do not advertise rdma get TCP)"
    log.info("memkv data plane: %s", why)
    return "rdma", why, chooser


def _store_outcome(oks: list[bool], reachable: int) -> str:
    """``ok``: every key stored; ``partial``: some; ``unavailable``: none, and no node could be
    reached (the cluster is down or not yet found); ``failed``: none, though nodes answered."""
    if all(oks):
        return "ok"
    if any(oks):
        return "partial"
    return "unavailable" if reachable == 0 else "failed"


def _connect(s: AdapterSettings, metrics: AdapterMetrics, chooser: TransportChooser | None = None) -> ClusterClient:
    """The cluster client, started. With no node answering: fail_fast raises (``lmcache server``
    exits); otherwise the adapter starts degraded (misses, failed stores) and the client keeps
    trying in the background, so a memory-tier outage never stops inference workers."""
    from lmcache_memkv.cluster import ClusterClient
    from lmcache_memkv.cluster.bootstrap import KeyRefused

    errors = metrics.node_errors
    client = ClusterClient(
        list(s.servers),
        key=s.auth_key,
        replicas=s.replicas,
        timeout_s=s.timeout_s,
        tls_ca=s.tls_ca,
        on_node_error=lambda node_id, kind: errors.labels(node_id, kind).inc(),
        cluster_id=s.cluster_id,
        member_client_factory=chooser,
    )
    try:
        client.start()
        metrics.connected.set(1)
        return client
    except KeyRefused as exc:
        problem = f"memkv adapter: the MemKV cluster refused this sidecar's key: {exc}"
    except ConnectError as exc:
        # The error names every endpoint asked and why each failed, and what 'servers' must list.
        problem = f"memkv adapter cannot reach the MemKV cluster (servers from {s.sources.get('servers', 'config')}): {exc}"
    if s.fail_fast:
        client.close()
        raise ConnectError(problem) from None
    metrics.connected.set(0)
    log.warning(
        "%s -- starting DEGRADED (fail_fast / MEMKV_FAIL_FAST is off): lookups miss and stores fail until a node answers; "
        "retrying in the background",
        problem,
    )

    def connected(endpoint: str) -> None:
        metrics.connected.set(1)
        log.info("memkv adapter connected to the MemKV cluster through %s: leaving degraded mode", endpoint)

    client.start_in_background(connected)
    return client


def _create(config: L2AdapterConfigBase, l1_memory_desc: L1MemoryDesc | None = None) -> L2AdapterInterface:
    if not isinstance(config, MemKVL2AdapterConfig):
        raise TypeError(f"expected MemKVL2AdapterConfig, got {type(config).__name__}")
    return MemKVL2Adapter(config, l1_memory_desc)


def _register() -> None:
    from lmcache.v1.distributed.l2_adapters.config import _L2_ADAPTER_CONFIG_REGISTRY

    if TYPE_NAME in _L2_ADAPTER_CONFIG_REGISTRY:  # imported twice under different names
        return
    register_l2_adapter_type(TYPE_NAME, MemKVL2AdapterConfig)
    register_l2_adapter_factory(TYPE_NAME, _create)


_setup_logging()
_register()

__all__ = ["FIELDS", "MemKVL2Adapter", "MemKVL2AdapterConfig"]
