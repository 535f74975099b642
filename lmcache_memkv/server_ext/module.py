"""LMCache server module exposing MemKV status through the sidecar's own request transport.

Load it into an unmodified sidecar::

    lmcache server ... --l2-adapter '{"type":"memkv","servers":"10.0.0.5:9901"}' \\
        --server-module '{"module_path":"lmcache_memkv.server_ext.module"}'

and call it with :func:`lmcache_memkv.server_ext.client.call_server_module` (re-exported
here). Handlers (request payload: empty, or a JSON object; reply: a JSON object):

- ``memkv.status``: each memkv adapter's ``report_status()``.
- ``memkv.view``: each memkv adapter's cluster view (epoch and members).

Every reply carries ``ok``. With no memkv adapter configured the reply is
``{"ok": false, "error": "no_memkv_adapter", ...}``; a failing adapter shows up as an
``error`` in its own entry. Request option: ``{"index": N}`` picks the adapter whose
LMCache L2 index is N. Adapters are looked up on every call, so adapters added or removed
at run time are seen.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from lmcache.v1.multiprocess.ext_server_module import ExtServerModuleBuildContext, server_module_handler

from lmcache_memkv.server_ext.client import ServerModuleCallError, call_json, call_server_module

if TYPE_CHECKING:
    from lmcache.v1.multiprocess.engine_context import MPCacheServerContext

log = logging.getLogger("memkv.server_module")

NAMESPACE = "memkv"
METHOD_STATUS = f"{NAMESPACE}.status"
METHOD_VIEW = f"{NAMESPACE}.view"
ADAPTER_TYPE = "memkv"
_ADAPTER_MODULE = "lmcache_memkv.adapter.memkv_l2_adapter"
_MEMBER_FIELDS = (
    "node_id",
    "incarnation",
    "state",
    "data_endpoint",
    "control_endpoint",
    "capacity_bytes",
    "used_bytes",
)
_MAX_WRAPPING = 8  # wrappers (serde, fault injection) around one adapter; guards cycles too


class BadRequest(ValueError):
    """The request payload is not an empty or JSON-object payload the handler understands."""


def _unwrap(adapter: object) -> object:
    """Peel LMCache's wrapper adapters (serde wrapper's ``inner_adapter``, others' ``_inner``)."""
    for _ in range(_MAX_WRAPPING):
        inner = getattr(adapter, "inner_adapter", None)
        if inner is None:
            inner = getattr(adapter, "_inner", None)
        if inner is None or inner is adapter:
            break
        adapter = inner
    return adapter


def _is_memkv(type_name: str, adapter: object) -> bool:
    if type_name == ADAPTER_TYPE:
        return True
    # A memkv adapter under a differently-named wrapper (e.g. fault_inject): the adapter
    # module is loaded whenever one exists, so no import is needed to check.
    module = sys.modules.get(_ADAPTER_MODULE)
    cls = getattr(module, "MemKVL2Adapter", None) if module is not None else None
    return isinstance(cls, type) and isinstance(adapter, cls)


def _jsonable(value: Any) -> Any:
    """Reduce ``value`` to JSON types (enums by name, dataclasses by field, the rest by ``str``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)


def _member(member: object) -> dict[str, Any]:
    """The documented member fields (``None`` where absent), plus any other field a dataclass member has."""
    out = {name: _jsonable(getattr(member, name, None)) for name in _MEMBER_FIELDS}
    if dataclasses.is_dataclass(member) and not isinstance(member, type):
        for f in dataclasses.fields(member):
            out.setdefault(f.name, _jsonable(getattr(member, f.name)))
    return out


def _cluster_view(adapter: object) -> dict[str, Any]:
    cluster = getattr(adapter, "cluster", None)
    if cluster is None:
        raise RuntimeError(f"{type(adapter).__name__} exposes no cluster client")
    members = [_member(m) for m in cluster.members()]
    members.sort(key=lambda m: str(m["node_id"]))
    return {"epoch": _jsonable(cluster.epoch), "members": members}


def _adapter_status(adapter: object) -> dict[str, Any]:
    report: Callable[[], dict[str, Any]] = adapter.report_status  # type: ignore[attr-defined]
    status = report()
    if not isinstance(status, dict):
        raise RuntimeError(f"report_status() returned {type(status).__name__}, not a dict")
    return {str(k): _jsonable(v) for k, v in status.items()}


def _parse_request(payload: bytes) -> dict[str, Any]:
    if not payload.strip():
        return {}
    try:
        request = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request payload must be empty or a JSON object: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"request payload must be a JSON object, got {type(request).__name__}")
    unknown = sorted(set(request) - {"index"})
    if unknown:
        raise BadRequest(f"unknown request field(s) {unknown}; accepted: ['index']")
    index = request.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise BadRequest(f"'index' must be an integer L2 adapter index, got {index!r}")
    return request


def _reply(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class MemKVServerModule:
    """A transport-neutral LMCache engine module answering ``memkv.*`` calls."""

    def __init__(self, ctx: MPCacheServerContext) -> None:
        self._ctx = ctx

    @property
    def context(self) -> MPCacheServerContext:
        return self._ctx

    # ------------------------------------------------------------------ adapters

    def _all_adapters(self) -> list[tuple[int, str, object]]:
        """(L2 index, type name, adapter) of every L2 adapter, wrappers peeled."""
        out: list[tuple[int, str, object]] = []
        for desc, adapter in self._ctx.storage_manager.l2_adapters():
            try:
                type_name = desc.type_name
            except Exception:  # a config LMCache cannot name: judge by the adapter itself
                type_name = "?"
            out.append((desc.index, type_name, _unwrap(adapter)))
        return out

    def memkv_adapters(self) -> Iterator[tuple[int, object]]:
        for index, type_name, adapter in self._all_adapters():
            if _is_memkv(type_name, adapter):
                yield index, adapter

    # ------------------------------------------------------------------ handlers

    def _answer(self, method: str, payload: bytes, per_adapter: Callable[[object], dict[str, Any]]) -> bytes:
        try:
            request = _parse_request(payload)
        except BadRequest as exc:
            return _reply({"ok": False, "method": method, "error": "bad_request", "message": str(exc)})
        adapters = list(self.memkv_adapters())
        wanted = request.get("index")
        if wanted is not None:
            adapters = [(i, a) for i, a in adapters if i == wanted]
        if not adapters:
            return _reply(self._no_adapter(method, wanted))
        entries: list[dict[str, Any]] = []
        for index, adapter in adapters:
            try:
                entries.append({"index": index, **per_adapter(adapter)})
            except Exception as exc:  # one broken adapter must not hide the others
                log.warning("%s: memkv adapter %d failed: %s", method, index, exc)
                entries.append({"index": index, "error": f"{type(exc).__name__}: {exc}"})
        ok = all("error" not in e for e in entries)
        return _reply({"ok": ok, "method": method, "adapters": entries})

    def _no_adapter(self, method: str, wanted: int | None) -> dict[str, Any]:
        configured = [{"index": i, "type": t} for i, t, _ in self._all_adapters()]
        if wanted is None:
            message = (
                "no memkv L2 adapter is configured in this lmcache server; start it with "
                '--l2-adapter \'{"type":"memkv","servers":"HOST:PORT"}\''
            )
        else:
            message = f"no memkv L2 adapter at index {wanted}"
        return {
            "ok": False,
            "method": method,
            "error": "no_memkv_adapter",
            "message": message,
            "l2_adapters": configured,
        }

    @server_module_handler(METHOD_STATUS)
    def status(self, payload: bytes) -> bytes:
        """Each memkv adapter's ``report_status()``."""
        return self._answer(METHOD_STATUS, payload, lambda a: {"status": _adapter_status(a)})

    @server_module_handler(METHOD_VIEW)
    def view(self, payload: bytes) -> bytes:
        """Each memkv adapter's cluster view: epoch and members."""
        return self._answer(METHOD_VIEW, payload, _cluster_view)

    # ------------------------------------------------------------------ EngineModule

    def report_status(self) -> dict:
        # Merged into the sidecar's /status on every scrape: keep it free of network calls.
        try:
            count = sum(1 for _ in self.memkv_adapters())
        except Exception:
            count = -1
        return {"memkv_server_module": {"methods": [METHOD_STATUS, METHOD_VIEW], "memkv_adapters": count}}

    def close(self) -> None:
        return None


def build_server_modules(build: ExtServerModuleBuildContext) -> MemKVServerModule:
    """Factory named by ``--server-module '{"module_path":"lmcache_memkv.server_ext.module"}'``."""
    if build.config:
        raise ValueError(
            f"memkv server module takes no config fields, got {sorted(build.config)}; "
            'pass \'--server-module {"module_path":"lmcache_memkv.server_ext.module"}\''
        )
    return MemKVServerModule(build.server_context)


__all__ = [
    "METHOD_STATUS",
    "METHOD_VIEW",
    "MemKVServerModule",
    "ServerModuleCallError",
    "build_server_modules",
    "call_json",
    "call_server_module",
]
