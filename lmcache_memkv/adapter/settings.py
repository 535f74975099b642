"""Adapter settings and their resolution chain (no LMCache imports: testable on its own).

Precedence, lowest first: built-in defaults < ``MEMKV_CONFIG`` yaml < ``MEMKV_*`` environment
< the adapter's JSON fields. Every invalid value raises ConfigError naming the field, where
the value came from, and the accepted range.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_memkv.auth import parse_key
from lmcache_memkv.cpus import CGROUP_CPU_MAX, usable_cpus
from lmcache_memkv.endpoints import parse_endpoint, split_servers
from lmcache_memkv.errors import ConfigError

TRANSPORTS = ("auto", "tcp", "rdma")
# Keys LMCache itself reads from every --l2-adapter JSON; not ours to reject.
_LMCACHE_KEYS = frozenset({"type", "affinity_tag", "shared", "eviction", "persist_enabled", "serde"})
_ENV = {
    "servers": "MEMKV_SERVERS",
    "prefix": "MEMKV_PREFIX",
    "replicas": "MEMKV_REPLICAS",
    "transport": "MEMKV_TRANSPORT",
    "num_workers": "MEMKV_NUM_WORKERS",
    "timeout_s": "MEMKV_TIMEOUT_S",
    "lease_ttl_s": "MEMKV_LEASE_TTL_S",
    "auth_key": "MEMKV_AUTH_KEY",
    "auth_key_file": "MEMKV_AUTH_KEY_FILE",
    "tls_ca": "MEMKV_TLS_CA",
    "rdma_devices": "MEMKV_RDMA_DEVICES",
    "rdma_port": "MEMKV_RDMA_PORT",
    "rdma_gid_index": "MEMKV_RDMA_GID_INDEX",
    "fail_fast": "MEMKV_FAIL_FAST",
    "cluster_id": "MEMKV_CLUSTER_ID",
}
# JSON may name a key file but never carry the key itself (it would show in `ps`).
# (``auth_key`` stays listed so the JSON check can refuse it by name.)
FIELDS = tuple(_ENV)


@dataclass(frozen=True)
class AdapterSettings:
    servers: tuple[str, ...]
    prefix: str = ""
    replicas: int = 1
    transport: str = "auto"
    num_workers: int = 0  # 0: default_workers()
    timeout_s: float = 5.0
    lease_ttl_s: float = 30.0
    auth_key: bytes | None = field(default=None, repr=False)
    tls_ca: str | None = None
    rdma_devices: tuple[str, ...] = ()
    rdma_port: int = 1
    rdma_gid_index: int = 0
    fail_fast: bool = False  # refuse to start (as before) instead of starting degraded
    cluster_id: str | None = None  # refuse nodes of another cluster (None: pin the first one seen)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)  # field -> where it came from

    @property
    def workers(self) -> int:
        """I/O threads per operation kind: ``num_workers``, or ``default_workers()`` for 0."""
        return self.num_workers or default_workers()


MAX_DEFAULT_WORKERS = 4


def default_workers(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """I/O threads per operation kind when ``num_workers`` is 0: one per CPU this process may use,
    2 to 4. Each runs one transfer at a time; on a host with few CPUs, more transfers at once than
    CPUs fight over them and the GIL and move less in all (peers.py on 2 CPUs, 2 threads rather
    than 4: store at 64 KiB +3-40%; at 1 and 8 MiB within the noise, store at 16 in flight ~5% less)."""
    return min(MAX_DEFAULT_WORKERS, max(2, usable_cpus(cpu_max)))


def _where(source: str) -> str:
    return f" (from {source})" if source else ""


def _int(name: str, raw: Any, source: str, lo: int, hi: int) -> int:
    if isinstance(raw, bool):
        raise ConfigError(f"memkv adapter: '{name}' must be an integer in {lo}..{hi}, got {raw!r}{_where(source)}")
    try:
        value = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
    except (TypeError, ValueError):
        value = None
    if value is None or not lo <= value <= hi:
        raise ConfigError(f"memkv adapter: '{name}' must be an integer in {lo}..{hi}, got {raw!r}{_where(source)}")
    return value


def _float(name: str, raw: Any, source: str, lo: float, hi: float) -> float:
    try:
        value = float(raw) if not isinstance(raw, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None or not lo < value <= hi:
        raise ConfigError(f"memkv adapter: '{name}' must be a number in ({lo}, {hi}], got {raw!r}{_where(source)}")
    return value


def _bool(name: str, raw: Any, source: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"memkv adapter: '{name}' must be true or false, got {raw!r}{_where(source)}")


def _str_list(name: str, raw: Any, source: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        return tuple(split_servers(raw))
    if isinstance(raw, list | tuple) and all(isinstance(x, str) for x in raw):
        return tuple(x.strip() for x in raw if x.strip())
    raise ConfigError(f"memkv adapter: '{name}' must be a comma-separated string or a list of strings{_where(source)}")


def _load_yaml(path: str) -> dict[str, Any]:
    from lmcache_memkv.yamlfile import load_mapping

    try:
        data = load_mapping(path, "MEMKV_CONFIG")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    unknown = sorted(set(data) - set(_ENV))
    if unknown:
        raise ConfigError(f"MEMKV_CONFIG: {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(_ENV)}")
    return data


def _read_key_file(value: tuple[Any, str]) -> str:
    path, source = str(value[0]).strip(), value[1]
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"memkv adapter: 'auth_key_file' {path}{_where(source)}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"memkv adapter: 'auth_key_file' {path}{_where(source)}: not a text file") from None


def resolve(fields: Mapping[str, Any], env: Mapping[str, str] | None = None) -> AdapterSettings:
    """Merge defaults, MEMKV_CONFIG, MEMKV_* and ``fields`` (the adapter JSON) and validate."""
    environ = os.environ if env is None else env
    unknown = sorted(set(fields) - set(FIELDS) - _LMCACHE_KEYS)
    if unknown:
        raise ConfigError(f"memkv adapter: unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    if "auth_key" in fields:
        raise ConfigError(
            "memkv adapter: do not put 'auth_key' in the JSON; use 'auth_key_file' or MEMKV_AUTH_KEY_FILE (a file)"
        )

    raw: dict[str, tuple[Any, str]] = {}
    # Levels, lowest first. A key file read at one level overrides a key from a lower level and,
    # at the same level, wins over MEMKV_AUTH_KEY / 'auth_key' (the file is the safer channel).
    levels: list[tuple[dict[str, tuple[Any, str]], str]] = []
    config_path = environ.get("MEMKV_CONFIG", "").strip()
    if config_path:
        levels.append(({k: (v, f"MEMKV_CONFIG {config_path}") for k, v in _load_yaml(config_path).items()}, "yaml"))
    levels.append(({k: (environ[var], var) for k, var in _ENV.items() if environ.get(var, "").strip()}, "env"))
    levels.append(({k: (v, "adapter JSON") for k, v in fields.items() if k in _ENV}, "json"))
    for level, _ in levels:
        key_file = level.pop("auth_key_file", None)
        raw.update(level)
        if key_file is not None and str(key_file[0]).strip():
            raw["auth_key"] = (_read_key_file(key_file), f"auth_key_file {str(key_file[0]).strip()} (from {key_file[1]})")

    def get(name: str) -> tuple[Any, str] | None:
        return raw.get(name)

    out: dict[str, Any] = {}
    sources = {k: src for k, (_, src) in raw.items()}

    servers = get("servers")
    if servers is None:
        raise ConfigError(
            "memkv adapter: no servers configured; set 'servers' in the adapter JSON "
            '(e.g. {"type":"memkv","servers":"127.0.0.1:9901"}), MEMKV_SERVERS, or MEMKV_CONFIG'
        )
    out["servers"] = _str_list("servers", *servers)
    if not out["servers"]:
        raise ConfigError(f"memkv adapter: 'servers' is empty{_where(servers[1])}")
    for s in out["servers"]:
        try:
            parse_endpoint(s, field="servers")
        except ValueError as exc:
            raise ConfigError(f"memkv adapter: {exc}{_where(servers[1])}") from None
    if (v := get("prefix")) is not None:
        if not isinstance(v[0], str) or len(v[0].encode()) > 128:
            raise ConfigError(f"memkv adapter: 'prefix' must be a string of at most 128 bytes{_where(v[1])}")
        out["prefix"] = v[0]
    if (v := get("replicas")) is not None:
        out["replicas"] = _int("replicas", *v, 1, 8)
    if (v := get("transport")) is not None:
        t = str(v[0]).strip().lower()
        if t not in TRANSPORTS:
            raise ConfigError(f"memkv adapter: 'transport' must be one of {', '.join(TRANSPORTS)}, got {v[0]!r}{_where(v[1])}")
        out["transport"] = t
    if (v := get("num_workers")) is not None:
        out["num_workers"] = _int("num_workers", *v, 0, 64)
    if (v := get("timeout_s")) is not None:
        out["timeout_s"] = _float("timeout_s", *v, 0.0, 300.0)
    if (v := get("lease_ttl_s")) is not None:
        out["lease_ttl_s"] = _float("lease_ttl_s", *v, 0.0, 3600.0)
    if (v := get("auth_key")) is not None and str(v[0]).strip():
        try:
            out["auth_key"] = parse_key(str(v[0]), source=v[1])
        except ValueError as exc:
            raise ConfigError(f"memkv adapter: {exc}") from None
    if (v := get("tls_ca")) is not None and str(v[0]).strip():
        if not Path(str(v[0])).is_file():
            raise ConfigError(f"memkv adapter: 'tls_ca' {v[0]!r} is not a readable file{_where(v[1])}")
        out["tls_ca"] = str(v[0])
    if (v := get("rdma_devices")) is not None:
        out["rdma_devices"] = _str_list("rdma_devices", *v)
    if (v := get("rdma_port")) is not None:
        out["rdma_port"] = _int("rdma_port", *v, 1, 255)
    if (v := get("rdma_gid_index")) is not None:
        out["rdma_gid_index"] = _int("rdma_gid_index", *v, 0, 255)
    if (v := get("fail_fast")) is not None:
        out["fail_fast"] = _bool("fail_fast", *v)
    if (v := get("cluster_id")) is not None and str(v[0]).strip():
        if not isinstance(v[0], str) or len(v[0].strip().encode()) > 255:
            raise ConfigError(f"memkv adapter: 'cluster_id' must be a string of at most 255 bytes{_where(v[1])}")
        out["cluster_id"] = v[0].strip()
    return AdapterSettings(sources=sources, **out)
