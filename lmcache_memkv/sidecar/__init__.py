"""A real ``lmcache server`` for tests and demos, driven by LMCache's own CPU-mode MP client.

``process`` starts and watches the server (cheap to import); ``workload`` drives it and pulls in
torch and LMCache, so its names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmcache_memkv.sidecar.process import (
    SidecarAdmin,
    SidecarConfig,
    SidecarEndpoints,
    SidecarError,
    SidecarProcess,
    SidecarStartError,
    StoreBacklog,
    parse_metric_value,
)

if TYPE_CHECKING:
    from lmcache_memkv.sidecar.workload import (
        ChunkMismatch,
        KVGeometry,
        LatencyStats,
        LookupReport,
        ProgressEvent,
        RequestSpec,
        RetrieveReport,
        StoreReport,
        Workload,
        WorkloadConfig,
        make_requests,
    )

_LAZY = {
    "ChunkMismatch",
    "KVGeometry",
    "LatencyStats",
    "LookupReport",
    "ProgressEvent",
    "RequestSpec",
    "RetrieveReport",
    "StoreReport",
    "Workload",
    "WorkloadConfig",
    "make_requests",
}

__all__ = [
    "ChunkMismatch",
    "KVGeometry",
    "LatencyStats",
    "LookupReport",
    "ProgressEvent",
    "RequestSpec",
    "RetrieveReport",
    "SidecarAdmin",
    "SidecarConfig",
    "SidecarEndpoints",
    "SidecarError",
    "SidecarProcess",
    "SidecarStartError",
    "StoreBacklog",
    "StoreReport",
    "Workload",
    "WorkloadConfig",
    "make_requests",
    "parse_metric_value",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lmcache_memkv.sidecar import workload

        return getattr(workload, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
