"""Drive a running ``lmcache server`` with LMCache's own CPU-mode MP client and check every byte.

The client is LMCache's ``ServerBenchClient`` (what ``lmcache bench server --mode cpu
--transfer-mode lmcache_driven`` uses): the KV cache lives in CPU tensors that the client moves
into POSIX shared memory and registers with the server, which then copies blocks in and out
itself, the same path ``LMCacheMPConnector`` takes.

Every request is reproducible from ``(seed, index, num_tokens)``: its token ids (hence LMCache's
chunk hashes) and the bytes of each chunk are derived from that triple, so a fresh ``Workload``
with the same seed can retrieve and verify what an earlier one stored, also from a restarted
server whose L1 is empty.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from lmcache_memkv.sidecar.process import SidecarAdmin, SidecarEndpoints, SidecarProcess

if TYPE_CHECKING:
    import torch
    from lmcache.cli.commands.bench.server_bench.client import LookupResult, RequestContext, ServerBenchClient

__all__ = [
    "ChunkMismatch",
    "KVGeometry",
    "LatencyStats",
    "LookupReport",
    "Operation",
    "ProgressCallback",
    "ProgressEvent",
    "RequestSpec",
    "RetrieveReport",
    "StoreReport",
    "Workload",
    "WorkloadConfig",
    "make_requests",
]

_log = logging.getLogger(__name__)

Operation = Literal["store", "retrieve", "lookup"]
# Token ids stay inside a plausible vocabulary; 0 is avoided as it is often a pad id.
_VOCAB = 50_000
# vLLM never hands out block 0 (it is its null block, and LMCache skips chunks made only of the
# null block id), so requests start at block 1.
_FIRST_BLOCK = 1
_RPC_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class KVGeometry:
    """Paged KV cache shape of the simulated engine (vLLM NHD layout, classical K/V).

    The default makes one 256-token chunk 512 KiB: 4 layers x K/V x 256 tokens x 2 heads x 64 x fp16.
    """

    num_layers: int = 4
    num_heads: int = 2
    head_size: int = 64
    block_size: int = 16
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_size", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def element_size(self) -> int:
        import torch
        from lmcache.v1.kv_layer_groups import DTYPE_MAP

        if self.dtype not in DTYPE_MAP:
            raise ValueError(f"dtype {self.dtype!r} not one of {sorted(DTYPE_MAP)}")
        return int(torch.empty((), dtype=DTYPE_MAP[self.dtype]).element_size())

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_heads * self.head_size * self.element_size()

    def chunk_bytes(self, chunk_size: int) -> int:
        """Bytes of one LMCache chunk (all layers, K and V)."""
        return chunk_size * self.bytes_per_token()

    def shape_spec(self, num_blocks: int) -> str:
        """LMCache's ``--kvcache-shape-spec`` string for this geometry."""
        return f"(2,{num_blocks},{self.block_size},{self.num_heads},{self.head_size}):{self.dtype}:{self.num_layers}"


@dataclass(frozen=True)
class WorkloadConfig:
    """How the workload generates and paces requests.

    ``pace_stores`` waits, after every stored request, until the sidecar's store controller has
    written everything to L2: LMCache's L1 is write-behind, and without pacing a test measures
    LMCache's back-pressure rather than the L2 adapter. ``l1_headroom`` additionally waits before
    each store and each retrieve until L1 usage is below that ratio: LMCache evicts only once a
    second, a store into a full L1 drops chunks, and an L2 hit needs L1 room to be prefetched.

    ``blocking_lookup`` waits for a LOOKUP's prefetch with one WAIT_PREFETCH_STATUS call (LMCache's
    own blocking wait, as its SGLang adapter does); ``False`` uses ``ServerBenchClient.lookup``,
    which polls QUERY_PREFETCH_STATUS with 50 ms sleeps, so every L2 hit costs at least 50 ms.

    ``torch_threads`` is set for this whole process at ``connect()`` (``None`` leaves torch's
    default): the client's fills and byte checks are many small tensor ops, and torch's intra-op
    threads spinning for the same cores as the sidecar made them up to 80x slower on a busy
    2-core machine.
    """

    geometry: KVGeometry = field(default_factory=KVGeometry)
    seed: int = 0
    max_tokens_per_request: int = 4096
    pace_stores: bool = True
    drain_timeout_s: float = 30.0
    l1_headroom: float | None = None
    l1_headroom_timeout_s: float = 10.0
    blocking_lookup: bool = True
    lookup_timeout_s: float = 10.0
    torch_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.lookup_timeout_s <= 0:
            raise ValueError(f"lookup_timeout_s must be > 0, got {self.lookup_timeout_s}")
        if self.max_tokens_per_request <= 0:
            raise ValueError(f"max_tokens_per_request must be > 0, got {self.max_tokens_per_request}")
        if self.l1_headroom is not None and not 0.0 < self.l1_headroom <= 1.0:
            raise ValueError(f"l1_headroom must be in (0, 1], got {self.l1_headroom}")


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestSpec:
    """The identity of one synthetic request; everything else is derived from it."""

    seed: int
    index: int
    num_tokens: int

    def token_ids(self) -> tuple[int, ...]:
        # random.Random seeded with a str is stable across processes and Python versions (sha512).
        rng = random.Random(f"memkv-sidecar/tokens/{self.seed}/{self.index}")
        return tuple(rng.randrange(1, _VOCAB) for _ in range(self.num_tokens))

    def chunk_seed(self, chunk: int) -> int:
        """Seed of the bytes of one chunk (independent of the client's memory)."""
        digest = hashlib.blake2b(f"memkv-sidecar/kv/{self.seed}/{self.index}/{chunk}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") & (2**63 - 1)

    def full_chunks(self, chunk_size: int) -> int:
        return self.num_tokens // chunk_size


def make_requests(seed: int, n_requests: int, tokens_per_request: int, start_index: int = 0) -> list[RequestSpec]:
    """``n_requests`` distinct requests; the same arguments give the same requests anywhere."""
    if n_requests < 0:
        raise ValueError(f"n_requests must be >= 0, got {n_requests}")
    return [RequestSpec(seed, i, tokens_per_request) for i in range(start_index, start_index + n_requests)]


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LatencyStats:
    """Per-request latency summary in milliseconds (zeros when there were no samples)."""

    count: int = 0
    mean_ms: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    max_ms: float = 0.0

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> LatencyStats:
        if not samples_ms:
            return cls()
        ordered = sorted(samples_ms)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

        return cls(len(ordered), sum(ordered) / len(ordered), pct(0.50), pct(0.95), ordered[-1])


def _mib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / (1024 * 1024) / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class StoreReport:
    """Outcome of storing requests.

    LMCache's STORE reply only says the call did not fail outright: chunks it could not place in
    a full L1 are dropped silently. ``chunks_acked`` counts chunks of requests whose reply was OK;
    ``chunks_dropped`` is the server's count of L1 allocation failures during these stores (from
    ``/metrics``, so it assumes no other client stores at the same time). ``busy_s`` excludes the
    pacing waits (``pacing_wait_s``) and the time spent writing the requests' bytes into the
    client's KV pages (``fill_s``: the simulated engine's work, not the store path's).
    """

    requests: tuple[RequestSpec, ...]
    chunks_attempted: int
    chunks_acked: int
    chunks_dropped: int
    failed_requests: int
    chunk_bytes: int
    elapsed_s: float
    busy_s: float
    pacing_wait_s: float
    latency: LatencyStats
    fill_s: float = 0.0

    @property
    def chunks_stored(self) -> int:
        return max(self.chunks_acked - self.chunks_dropped, 0)

    @property
    def bytes_stored(self) -> int:
        return self.chunks_stored * self.chunk_bytes

    @property
    def ok(self) -> bool:
        return self.failed_requests == 0 and self.chunks_stored == self.chunks_attempted

    @property
    def throughput_mib_s(self) -> float:
        return _mib_per_s(self.bytes_stored, self.busy_s)


@dataclass(frozen=True)
class ChunkMismatch:
    """One retrieved chunk whose bytes differ from what was stored."""

    request_index: int
    chunk: int
    differing_bytes: int


@dataclass(frozen=True)
class RetrieveReport:
    """Outcome of retrieving requests into zeroed destinations and comparing every byte.

    ``chunks_hit`` is what LOOKUP promised (a prefix per request); ``chunks_retrieved`` is what
    RETRIEVE then delivered; ``chunks_verified`` of those matched byte for byte. ``misses`` are
    chunks LOOKUP did not find; ``retrieve_failures`` are chunks LOOKUP found but RETRIEVE failed.
    """

    requests: tuple[RequestSpec, ...]
    chunks_requested: int
    chunks_hit: int
    chunks_retrieved: int
    chunks_verified: int
    mismatches: int
    misses: int
    retrieve_failures: int
    failed_requests: int
    bytes_retrieved: int
    elapsed_s: float
    busy_s: float
    lookup_latency: LatencyStats
    retrieve_latency: LatencyStats
    mismatch_details: tuple[ChunkMismatch, ...] = ()

    @property
    def ok(self) -> bool:
        """Everything requested came back and matched."""
        return self.chunks_verified == self.chunks_requested and self.mismatches == 0

    @property
    def throughput_mib_s(self) -> float:
        return _mib_per_s(self.bytes_retrieved, self.busy_s)


@dataclass(frozen=True)
class LookupReport:
    """Outcome of LOOKUP-only requests (hit prefixes; the locks they take are released again)."""

    requests: tuple[RequestSpec, ...]
    chunks_requested: int
    chunks_hit: int
    misses: int
    failed_requests: int
    hits_per_request: tuple[int, ...]
    elapsed_s: float
    latency: LatencyStats


@dataclass(frozen=True)
class ProgressEvent:
    """Sent after each request; ``done``/``total`` count requests of the current operation."""

    op: Operation
    done: int
    total: int
    request: RequestSpec
    chunks: int
    ok: bool


ProgressCallback = Callable[[ProgressEvent], None]


# ---------------------------------------------------------------------------- the driver


class Workload:
    """LMCache's CPU-mode MP client (SHM, ``lmcache_driven``) bound to one sidecar.

    Usage::

        with SidecarProcess(cfg) as sidecar, Workload(sidecar, WorkloadConfig(seed=7)) as wl:
            stored = wl.store(8, 1024)
            report = wl.retrieve(stored.requests)
            assert report.ok
    """

    def __init__(
        self,
        sidecar: SidecarProcess | SidecarEndpoints,
        config: WorkloadConfig | None = None,
        *,
        progress: ProgressCallback | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config or WorkloadConfig()
        self.progress = progress
        endpoints = sidecar.endpoints if isinstance(sidecar, SidecarProcess) else sidecar
        self.endpoints = endpoints
        self.admin = sidecar.admin if isinstance(sidecar, SidecarProcess) else SidecarAdmin(endpoints.admin_url)
        self._sidecar = sidecar if isinstance(sidecar, SidecarProcess) else None
        self._client_log: Callable[[str], None] = log or _log.debug
        self._client: ServerBenchClient | None = None
        self._tensors: list[torch.Tensor] = []
        self._req_client: Any = None
        self._chunk_size = 0
        self._session_counter = 0
        self._pads: dict[int, torch.Tensor] = {}  # random pads by view size (see _expected)

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> Workload:
        """Register the KV cache with the sidecar (allocates the SHM-backed tensors)."""
        if self._client is not None:
            return self
        from lmcache.cli.commands.bench.server_bench.client import ServerBenchClient
        from lmcache.cli.commands.bench.server_bench.config import BenchConfig

        geo = self.config.geometry
        if self.config.torch_threads is not None:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        self._chunk_size = self.admin.chunk_size()
        if self._chunk_size % geo.block_size:
            raise ValueError(f"server chunk size {self._chunk_size} is not a multiple of block size {geo.block_size}")
        num_blocks = _FIRST_BLOCK + -(-self.config.max_tokens_per_request // geo.block_size)
        bench_config = BenchConfig(
            rpc_url=self.endpoints.rpc_url,
            http_url=self.endpoints.admin_url,
            mode="cpu",
            transfer_mode="lmcache_driven",
            tp_size=1,
            use_mla=False,
            num_tokens=self.config.max_tokens_per_request,
            kvcache_shape_spec=geo.shape_spec(num_blocks),
            num_blocks=num_blocks,
            block_size=geo.block_size,
        )
        client = ServerBenchClient(bench_config, self._client_log)
        client.start()
        try:
            self._tensors, self._req_client = _client_internals(client)
        except BaseException:
            client.close()
            raise
        self._client = client
        return self

    def close(self) -> None:
        """Unregister the KV cache and release the SHM segments. Idempotent."""
        client, self._client = self._client, None
        self._tensors, self._req_client = [], None
        if client is not None:
            client.close()

    def __enter__(self) -> Workload:
        return self.connect()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ properties

    @property
    def chunk_size(self) -> int:
        self._require_client()
        return self._chunk_size

    @property
    def chunk_bytes(self) -> int:
        return self.config.geometry.chunk_bytes(self.chunk_size)

    def requests(self, n_requests: int, tokens_per_request: int, start_index: int = 0) -> list[RequestSpec]:
        """The requests ``store(n_requests, tokens_per_request)`` would create (same seed, same requests)."""
        if tokens_per_request > self.config.max_tokens_per_request:
            raise ValueError(
                f"tokens_per_request {tokens_per_request} > max_tokens_per_request {self.config.max_tokens_per_request}"
            )
        if self._chunk_size and tokens_per_request < self._chunk_size:
            raise ValueError(f"tokens_per_request {tokens_per_request} is less than one chunk ({self._chunk_size})")
        return make_requests(self.config.seed, n_requests, tokens_per_request, start_index)

    # ------------------------------------------------------------------ operations

    def store(self, n_requests: int, tokens_per_request: int, *, start_index: int = 0) -> StoreReport:
        """Store ``n_requests`` new requests of ``tokens_per_request`` tokens (full chunks only)."""
        self._require_client()
        return self.store_requests(self.requests(n_requests, tokens_per_request, start_index))

    def store_requests(self, requests: Sequence[RequestSpec]) -> StoreReport:
        client = self._require_client()
        cfg = self.config
        attempted = acked = failed = 0
        latencies: list[float] = []
        pacing_wait = fill_s = 0.0
        drops_before = self._l1_store_drops()
        started = time.monotonic()
        for done, spec in enumerate(requests, 1):
            pacing_wait += self._wait_headroom()
            ctx = self._context(spec, "store")
            n_chunks = ctx.total_chunks
            fill_started = time.monotonic()
            for chunk in range(n_chunks):
                self._chunk_views(ctx, chunk, fill_from=spec)
            fill_s += time.monotonic() - fill_started
            result = client.store(ctx, 0, ctx.num_full_tokens)
            ok = result is not None and result.succeeded and bool(result.attempted_worker_ranks)
            if result is not None:
                latencies.append(result.latency_ms)
            client.end_session(ctx)
            attempted += n_chunks
            if ok:
                acked += n_chunks
            else:
                failed += 1
            if cfg.pace_stores:
                pacing_wait += self._wait_drained()
            self._report("store", done, len(requests), spec, n_chunks, ok)
        elapsed = time.monotonic() - started
        self.admin.wait_events_settled()
        return StoreReport(
            requests=tuple(requests),
            chunks_attempted=attempted,
            chunks_acked=acked,
            chunks_dropped=int(self._l1_store_drops() - drops_before),
            failed_requests=failed,
            chunk_bytes=self.chunk_bytes,
            elapsed_s=elapsed,
            busy_s=max(elapsed - pacing_wait - fill_s, 0.0),
            pacing_wait_s=pacing_wait,
            fill_s=fill_s,
            latency=LatencyStats.of(latencies),
        )

    def retrieve(self, requests: Sequence[RequestSpec]) -> RetrieveReport:
        """LOOKUP (which prefetches L2 hits into L1), then RETRIEVE the hit prefix into zeroed
        blocks and compare every byte with what the request's seed says was stored."""
        client = self._require_client()
        requested = hit_total = retrieved = verified = mismatched = misses = failures = failed = 0
        details: list[ChunkMismatch] = []
        lookup_ms: list[float] = []
        retrieve_ms: list[float] = []
        started = time.monotonic()
        for done, spec in enumerate(requests, 1):
            self._wait_headroom()  # an L2 hit is prefetched into L1 first, and needs room there
            ctx = self._context(spec, "retrieve")
            n_chunks = ctx.total_chunks
            requested += n_chunks
            for chunk in range(n_chunks):  # anything non-zero afterwards was written by the server
                for view in self._chunk_views(ctx, chunk):
                    view.zero_()
            lookup = self._lookup(ctx)
            lookup_ms.append(lookup.latency_ms)
            hit = lookup.hit_chunks if lookup.succeeded else 0
            hit_total += hit
            misses += n_chunks - hit
            ok = lookup.succeeded
            if hit:
                result = client.retrieve(ctx, 0, hit * self._chunk_size)
                if result is not None:
                    retrieve_ms.append(result.latency_ms)
                if result is not None and result.succeeded and result.attempted_worker_ranks:
                    retrieved += hit
                    for chunk in range(hit):
                        bad = self._compare_chunk(ctx, spec, chunk)
                        if bad:
                            mismatched += 1
                            details.append(ChunkMismatch(spec.index, chunk, bad))
                        else:
                            verified += 1
                else:
                    failures += hit
                    ok = False
            client.end_session(ctx)
            ok = ok and hit == n_chunks
            if not lookup.succeeded:
                failed += 1
            self._report("retrieve", done, len(requests), spec, n_chunks, ok)
        elapsed = time.monotonic() - started
        return RetrieveReport(
            requests=tuple(requests),
            chunks_requested=requested,
            chunks_hit=hit_total,
            chunks_retrieved=retrieved,
            chunks_verified=verified,
            mismatches=mismatched,
            misses=misses,
            retrieve_failures=failures,
            failed_requests=failed,
            bytes_retrieved=retrieved * self.chunk_bytes,
            elapsed_s=elapsed,
            busy_s=(sum(lookup_ms) + sum(retrieve_ms)) / 1000.0,
            lookup_latency=LatencyStats.of(lookup_ms),
            retrieve_latency=LatencyStats.of(retrieve_ms),
            mismatch_details=tuple(details[:32]),
        )

    def lookup(self, requests: Sequence[RequestSpec]) -> LookupReport:
        """LOOKUP only. LMCache read-locks (and prefetches from L2) what it finds until a RETRIEVE
        consumes it, so the locks are handed back with FREE_LOOKUP_LOCKS to leave L1 evictable."""
        client = self._require_client()
        requested = hit_total = failed = 0
        hits: list[int] = []
        latencies: list[float] = []
        started = time.monotonic()
        for done, spec in enumerate(requests, 1):
            ctx = self._context(spec, "lookup")
            requested += ctx.total_chunks
            result = self._lookup(ctx)
            latencies.append(result.latency_ms)
            hit = result.hit_chunks if result.succeeded else 0
            failed += 0 if result.succeeded else 1
            hits.append(hit)
            hit_total += hit
            if hit:
                self._free_lookup_locks(ctx, hit * self._chunk_size)
            client.end_session(ctx)
            self._report("lookup", done, len(requests), spec, ctx.total_chunks, hit == ctx.total_chunks)
        return LookupReport(
            requests=tuple(requests),
            chunks_requested=requested,
            chunks_hit=hit_total,
            misses=requested - hit_total,
            failed_requests=failed,
            hits_per_request=tuple(hits),
            elapsed_s=time.monotonic() - started,
            latency=LatencyStats.of(latencies),
        )

    # ------------------------------------------------------------------ internals

    def _require_client(self) -> ServerBenchClient:
        if self._client is None:
            raise RuntimeError("Workload is not connected; call connect() or use it as a context manager")
        return self._client

    def _context(self, spec: RequestSpec, op: Operation) -> RequestContext:
        from lmcache.cli.commands.bench.server_bench.client import RequestContext

        if spec.num_tokens > self.config.max_tokens_per_request:
            raise ValueError(f"request has {spec.num_tokens} tokens > max_tokens_per_request")
        n_chunks = spec.full_chunks(self._chunk_size)
        if n_chunks == 0:
            raise ValueError(f"request has {spec.num_tokens} tokens, less than one chunk ({self._chunk_size})")
        full_tokens = n_chunks * self._chunk_size
        self._session_counter += 1
        return RequestContext(
            sequence_id=spec.index,
            # Sessions are per operation: a session left over from a previous op must not be reused.
            request_id=f"memkv-{spec.seed}-{spec.index}-{op}-{self._session_counter}",
            request_kind=op,
            token_ids=spec.token_ids(),
            num_full_tokens=full_tokens,
            total_chunks=n_chunks,
            chunk_size=self._chunk_size,
            # Every request uses the same blocks: operations run one at a time and wait for the server.
            block_offset=_FIRST_BLOCK,
            num_blocks=full_tokens // self.config.geometry.block_size,
        )

    def _chunk_views(self, ctx: RequestContext, chunk: int, fill_from: RequestSpec | None = None) -> list[torch.Tensor]:
        """Byte views of one chunk's blocks in every layer; with ``fill_from``, write its content."""
        import torch

        blocks_per_chunk = self._chunk_size // self.config.geometry.block_size
        first = ctx.block_offset + chunk * blocks_per_chunk
        views: list[torch.Tensor] = []
        for layer, tensor in enumerate(self._tensors):
            # Blocks are dim 1 of (K/V, blocks, block_size, heads, head_size); dim 0 for MLA's rank 3.
            block_dim = 0 if tensor.dim() == 3 else 1
            view = tensor.narrow(block_dim, first, blocks_per_chunk).view(torch.uint8)
            if fill_from is not None:
                view.copy_(self._expected(fill_from.chunk_seed(chunk), layer, view))
            views.append(view)
        return views

    def _expected(self, chunk_seed: int, layer: int, view: torch.Tensor) -> torch.Tensor:
        """The content of one layer's view of a chunk: a window of a random pad at an offset the
        chunk seed picks, its first 8 bytes overwritten by ``chunk_seed ^ layer``. Every chunk and
        layer differs (a chunk landing in the wrong place is caught), at memcpy speed (drawing
        fresh random bytes per chunk made filling and checking the slowest part of a run)."""
        import torch

        n = view.numel()
        pad = self._pads.get(n)
        if pad is None:
            gen = torch.Generator().manual_seed(self.config.seed)
            pad = self._pads[n] = torch.randint(0, 256, (2 * n,), dtype=torch.uint8, generator=gen)
        mixed = (chunk_seed ^ (layer * 0x9E3779B97F4A7C15)) & (2**64 - 1)
        offset = mixed % n
        content = pad[offset : offset + n].clone()
        content[:8] = torch.frombuffer(bytearray((chunk_seed ^ layer).to_bytes(8, "little")), dtype=torch.uint8)
        return content.view(view.shape)

    def _compare_chunk(self, ctx: RequestContext, spec: RequestSpec, chunk: int) -> int:
        """Number of bytes of one chunk that differ from the expected content (0 = exact)."""
        differing = 0
        for layer, view in enumerate(self._chunk_views(ctx, chunk)):
            expected = self._expected(spec.chunk_seed(chunk), layer, view)
            if not bool(view.eq(expected).all()):
                differing += int((view != expected).sum().item())
        return differing

    def _lookup(self, ctx: RequestContext) -> LookupResult:
        """LOOKUP, then wait for its prefetch (L2 -> L1) to finish; returns the hit prefix."""
        client = self._require_client()
        if not self.config.blocking_lookup:
            return client.lookup(ctx)
        from lmcache.cli.commands.bench.server_bench.client import LookupResult
        from lmcache.cli.commands.bench.server_bench.helpers import _make_key, _send_lookup

        timeout_s = self.config.lookup_timeout_s
        # Same key shape as ServerBenchClient.lookup() (one KV rank).
        key = _make_key(ctx.token_ids, ctx.request_id, start=0, end=ctx.num_full_tokens, world_size=1)
        started = time.monotonic()
        error: str | None = None
        hit = 0
        if not _send_lookup(self._req_client, key):
            error = "timeout"
        else:
            # One blocking RPC instead of ServerBenchClient's 50 ms polls; bounded on both sides.
            try:
                result = self._req_client.wait_prefetch_status(ctx.request_id, timeout_s).result(
                    timeout=timeout_s + 5.0
                )
            except TimeoutError:
                result = None
            if result is None:
                error = "timeout"
            else:
                hit = min(int(result), ctx.total_chunks)
        return LookupResult(
            hit_chunks=hit, total_chunks=ctx.total_chunks, latency_ms=(time.monotonic() - started) * 1000, error=error
        )

    def _free_lookup_locks(self, ctx: RequestContext, hit_tokens: int) -> None:
        from lmcache.cli.commands.bench.server_bench.helpers import _make_key

        # Same key shape as ServerBenchClient.lookup() used, cut to the hit prefix.
        key = _make_key(ctx.token_ids, ctx.request_id, start=0, end=hit_tokens, world_size=1)
        self._req_client.free_lookup_locks(key, 1).result(timeout=_RPC_TIMEOUT_S)

    def _wait_headroom(self) -> float:
        if self.config.l1_headroom is None:
            return 0.0
        return self.admin.wait_l1_usage_below(self.config.l1_headroom, self.config.l1_headroom_timeout_s)

    def _l1_store_drops(self) -> float:
        return self.admin.metric("lmcache_mp_l1_allocation_failure_chunks", during="l1_store")

    def _wait_drained(self) -> float:
        if self._sidecar is not None:
            return self._sidecar.wait_store_drained(self.config.drain_timeout_s)
        return self.admin.wait_store_drained(self.config.drain_timeout_s)

    def _report(self, op: Operation, done: int, total: int, spec: RequestSpec, chunks: int, ok: bool) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(op=op, done=done, total=total, request=spec, chunks=chunks, ok=ok))


def _client_internals(client: ServerBenchClient) -> tuple[list[torch.Tensor], Any]:
    """The SHM-backed KV tensors and the request client of a started ``ServerBenchClient``.

    ``ServerBenchClient`` does not expose these, and byte-exact checks need the tensors (its own
    checksum path hashes whatever the pages hold, and its ``zero_destination`` is a no-op in
    lmcache_driven mode). All reliance on its private attributes is kept to this function.
    """
    workers = getattr(client, "_workers", None)
    req_client = getattr(client, "_req_client", None)
    if not workers or req_client is None or not hasattr(workers[0], "kv_caches"):
        raise RuntimeError(
            "this LMCache's ServerBenchClient no longer exposes _workers/_req_client; update workload.py"
        )
    return list(workers[0].kv_caches.values()), req_client
