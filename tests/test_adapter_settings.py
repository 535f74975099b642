"""The adapter's configuration chain: defaults < MEMKV_CONFIG < MEMKV_* < JSON, with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmcache_memkv.adapter.settings import default_workers, resolve
from lmcache_memkv.errors import ConfigError

KEY = "ab" * 32


def test_defaults_with_only_servers() -> None:
    s = resolve({"type": "memkv", "servers": "127.0.0.1:9901"}, env={})
    assert s.servers == ("127.0.0.1:9901",)
    assert (s.replicas, s.transport, s.num_workers, s.timeout_s, s.lease_ttl_s, s.prefix) == (1, "auto", 0, 5.0, 30.0, "")
    assert s.auth_key is None
    assert s.workers == default_workers()


@pytest.mark.parametrize(
    ("cpus", "cpu_max", "expected"),
    [(16, None, 4), (16, "max 100000\n", 4), (16, "250000 100000\n", 3), (16, "50000 100000\n", 2), (1, None, 2), (3, None, 3)],
)
def test_workers_default_to_the_cpus_two_to_four(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpus: int, cpu_max: str | None, expected: int
) -> None:
    """One I/O thread per CPU the sidecar may use (its affinity, capped by a container's CPU
    quota), at least two and at most four."""
    monkeypatch.setattr("lmcache_memkv.cpus.os.sched_getaffinity", lambda pid: set(range(cpus)))
    quota = tmp_path / "cpu.max"
    if cpu_max is not None:
        quota.write_text(cpu_max)
    assert default_workers(str(quota)) == expected


def test_workers_default_on_this_machine() -> None:
    assert default_workers("/nonexistent") == min(4, max(2, len(os.sched_getaffinity(0))))


def test_workers_setting_overrides_the_default() -> None:
    s = resolve({"servers": "h:1"}, env={"MEMKV_NUM_WORKERS": "7"})
    assert (s.num_workers, s.workers) == (7, 7)
    assert resolve({"servers": "h:1", "num_workers": 0}, env={}).workers == default_workers()


def test_precedence_yaml_env_json(tmp_path: Path) -> None:
    cfg = tmp_path / "memkv.yaml"
    cfg.write_text("servers: [a:1, b:2]\nreplicas: 2\ntimeout_s: 2.5\nprefix: yaml/\nauth_key: " + KEY + "\n")
    env = {"MEMKV_CONFIG": str(cfg), "MEMKV_REPLICAS": "3", "MEMKV_PREFIX": "env/"}
    s = resolve({"prefix": "json/"}, env=env)
    assert s.servers == ("a:1", "b:2")  # yaml only
    assert s.timeout_s == 2.5  # yaml only
    assert s.replicas == 3  # env beats yaml
    assert s.prefix == "json/"  # JSON beats env
    assert s.auth_key == bytes.fromhex(KEY)
    assert s.sources["replicas"] == "MEMKV_REPLICAS"
    assert s.sources["prefix"] == "adapter JSON"


def test_servers_list_and_env() -> None:
    s = resolve({}, env={"MEMKV_SERVERS": " h1:9901 , h2:9901,"})
    assert s.servers == ("h1:9901", "h2:9901")


@pytest.mark.parametrize(
    ("fields", "env", "needle"),
    [
        ({}, {}, "no servers configured"),
        ({"servers": "nohostport"}, {}, "servers"),
        ({"servers": "h:1", "replicas": 0}, {}, "'replicas' must be an integer in 1..8, got 0 (from adapter JSON)"),
        ({"servers": "h:1"}, {"MEMKV_REPLICAS": "two"}, "(from MEMKV_REPLICAS)"),
        ({"servers": "h:1", "transport": "carrier-pigeon"}, {}, "'transport' must be one of auto, tcp, rdma"),
        ({"servers": "h:1", "timeout_s": -1}, {}, "'timeout_s' must be a number"),
        ({"servers": "h:1", "num_workers": True}, {}, "'num_workers'"),
        ({"servers": "h:1", "num_workers": 65}, {}, "'num_workers' must be an integer in 0..64, got 65"),
        ({"servers": "h:1", "bogus": 1}, {}, "unknown field(s) bogus"),
        ({"servers": "h:1", "auth_key": KEY}, {}, "do not put 'auth_key' in the JSON"),
        ({"servers": "h:1"}, {"MEMKV_AUTH_KEY": "xyz"}, "MEMKV_AUTH_KEY: the auth key must be 64 hex characters"),
        ({"servers": "h:1"}, {"MEMKV_CONFIG": "/nonexistent/memkv.yaml"}, "MEMKV_CONFIG: cannot read"),
        ({"servers": "h:1", "tls_ca": "/nonexistent.pem"}, {}, "'tls_ca'"),
    ],
)
def test_bad_values_name_the_field(fields: dict, env: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(fields, env=env)
    assert needle in str(info.value)


def test_yaml_unknown_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("servers: h:1\nreplica: 2\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        resolve({}, env={"MEMKV_CONFIG": str(cfg)})


def test_lmcache_generic_keys_are_accepted() -> None:
    s = resolve({"type": "memkv", "servers": "h:1", "shared": True, "eviction": {}, "serde": None}, env={})
    assert s.servers == ("h:1",)


def test_auth_key_file(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text(KEY + "\n")
    s = resolve({"servers": "h:1", "auth_key_file": str(f)}, env={})
    assert s.auth_key == bytes.fromhex(KEY)


def test_cluster_id_from_json_or_env() -> None:
    assert resolve({"servers": "h:1"}, env={}).cluster_id is None
    assert resolve({"servers": "h:1", "cluster_id": "prod"}, env={}).cluster_id == "prod"
    assert resolve({"servers": "h:1"}, env={"MEMKV_CLUSTER_ID": " blue "}).cluster_id == "blue"
    with pytest.raises(ConfigError, match="cluster_id"):
        resolve({"servers": "h:1", "cluster_id": "x" * 300}, env={})
