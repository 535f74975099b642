"""The auth key travels as a file, and the recipes' sidecars never show it on the admin port.

LMCache's admin port answers ``GET /env`` with the sidecar's whole environment and no
authentication. These tests start the exact ``lmcache server`` command line of the Kubernetes
worker recipe and of ``deploy/dynamo/launch_worker.sh`` (on loopback ports, with a key file)
against a real keyed node, read ``/env``, and check that chunks still reach the node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from nodeproc import NodeFactory, NodeProcess

from lmcache_memkv.auth import load_key, new_key_hex
from lmcache_memkv.sidecar.process import (
    SIDECAR_ENV,
    SidecarAdmin,
    SidecarEndpoints,
    free_loopback_port,
    lmcache_command,
)

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "deploy" / "kubernetes" / "worker.yaml"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "configmap.yaml"
LAUNCH = ROOT / "deploy" / "dynamo" / "launch_worker.sh"
L1_GB = "0.25"  # the recipes' 8-20 GB pools do not fit a test box; nothing else is changed


@pytest.fixture
def key_file(tmp_path: Path) -> tuple[str, Path]:
    key = new_key_hex()
    path = tmp_path / "auth-key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key, path


# ----------------------------------------------------------------------------- unit: key sources


def test_load_key_prefers_the_file_and_reads_memkv_auth_key_file(key_file: tuple[str, Path], tmp_path: Path) -> None:
    key, path = key_file
    other = new_key_hex()
    assert load_key(env={"MEMKV_AUTH_KEY_FILE": str(path), "MEMKV_AUTH_KEY": other}) == bytes.fromhex(key)
    assert load_key(path, env={"MEMKV_AUTH_KEY": other}) == bytes.fromhex(key)
    assert load_key(env={"MEMKV_AUTH_KEY": other}) == bytes.fromhex(other)  # still works
    with pytest.raises(ValueError, match=r"MEMKV_AUTH_KEY_FILE: cannot read .*nope"):
        load_key(env={"MEMKV_AUTH_KEY_FILE": str(tmp_path / "nope")})
    bad = tmp_path / "bad"
    bad.write_text("xyz")
    with pytest.raises(ValueError, match=r"--auth-key-file .*bad.*64 hex"):
        load_key(bad, env={})


def test_adapter_reads_the_key_file_from_env_and_yaml(key_file: tuple[str, Path], tmp_path: Path) -> None:
    from lmcache_memkv.adapter.settings import resolve
    from lmcache_memkv.errors import ConfigError

    key, path = key_file
    s = resolve({"type": "memkv"}, env={"MEMKV_SERVERS": "127.0.0.1:9901", "MEMKV_AUTH_KEY_FILE": str(path)})
    assert s.auth_key == bytes.fromhex(key) and "MEMKV_AUTH_KEY_FILE" in s.sources["auth_key"]
    cfg = tmp_path / "memkv.yaml"
    cfg.write_text(f"servers: 127.0.0.1:9901\nauth_key_file: {path}\n")
    s = resolve({"type": "memkv"}, env={"MEMKV_CONFIG": str(cfg)})
    assert s.auth_key == bytes.fromhex(key) and "MEMKV_CONFIG" in s.sources["auth_key"]
    # The environment outranks the yaml; at one level the file outranks the plain key.
    other = new_key_hex()
    s = resolve({"type": "memkv"}, env={"MEMKV_CONFIG": str(cfg), "MEMKV_AUTH_KEY": other})
    assert s.auth_key == bytes.fromhex(other)
    s = resolve({"type": "memkv"}, env={"MEMKV_SERVERS": "a:1", "MEMKV_AUTH_KEY": other, "MEMKV_AUTH_KEY_FILE": str(path)})
    assert s.auth_key == bytes.fromhex(key)
    with pytest.raises(ConfigError, match=r"'auth_key_file' .*nope \(from MEMKV_AUTH_KEY_FILE\)"):
        resolve({"type": "memkv"}, env={"MEMKV_SERVERS": "a:1", "MEMKV_AUTH_KEY_FILE": str(tmp_path / "nope")})


def test_cli_commands_take_the_key_file_from_the_environment() -> None:
    from typer.testing import CliRunner

    from lmcache_memkv.cli.main import app

    runner = CliRunner()
    for command in ("node", "status", "stats", "bench"):
        out = runner.invoke(app, [command, "--help"], env={"COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb"}).output
        assert "MEMKV_AUTH_KEY_FILE" in out, f"memkv {command} --help does not name MEMKV_AUTH_KEY_FILE"


def test_node_and_status_take_the_key_file_from_the_environment(
    node_factory: NodeFactory, key_file: tuple[str, Path]
) -> None:
    key, path = key_file
    node = node_factory(env={"MEMKV_AUTH_KEY_FILE": str(path)}, args=["--control-listen", "127.0.0.1:0"])
    assert node.client(key=bytes.fromhex(key)).stats()["keys"] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMKV_")}

    def status(key_file: Path) -> subprocess.CompletedProcess[str]:
        cmd = [*_memkv(), "status", "--servers", str(node.control), "--json"]
        return subprocess.run(cmd, env={**env, "MEMKV_AUTH_KEY_FILE": str(key_file)}, capture_output=True, text=True, timeout=60)

    proc = status(path)
    assert proc.returncode == 0, proc.stderr
    wrong = path.parent / "wrong"
    wrong.write_text(new_key_hex())
    assert status(wrong).returncode != 0


def _memkv() -> list[str]:
    from lmcache_memkv.node.launcher import memkv_command

    return memkv_command()


# ----------------------------------------------------------------------------- the recipes' sidecars


def _sidecar_container() -> dict:
    (dep,) = [d for d in yaml.safe_load_all(WORKER.read_text()) if d and d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (c,) = [c for c in spec["initContainers"] if c.get("command", [])[:2] == ["lmcache", "server"]]
    return c


def recipe_argv(rpc_port: int, http_port: int, shm_name: str) -> list[str]:
    """worker.yaml's sidecar command line with only the ports, L1 size and SHM name changed."""
    c = _sidecar_container()
    replace = {
        "--port": str(rpc_port),
        "--http-port": str(http_port),
        "--l1-size-gb": L1_GB,
        "--shm-name": shm_name,
    }
    args = []
    for arg in c["args"]:
        name, eq, _ = arg.partition("=")
        args.append(f"{name}={replace[name]}" if eq and name in replace else arg)
    assert "--http-host=127.0.0.1" in args and "--host=127.0.0.1" in args
    return [*lmcache_command(), *c["command"][1:], *args]


def recipe_env(node: NodeProcess, key_path: Path, tmp_path: Path) -> dict[str, str]:
    """worker.yaml's sidecar env: the ConfigMap as a file, the key file, the test node as the server."""
    env = {e["name"]: e["value"] for e in _sidecar_container()["env"] if "value" in e}
    assert env["MEMKV_AUTH_KEY_FILE"].startswith("/var/run/secrets/")
    (cm,) = [d for d in yaml.safe_load_all(CONFIGMAP.read_text()) if d]
    config = tmp_path / "memkv.yaml"
    config.write_text(cm["data"]["memkv.yaml"])
    env |= {"MEMKV_SERVERS": str(node.control), "MEMKV_CONFIG": str(config), "MEMKV_AUTH_KEY_FILE": str(key_path)}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MEMKV_", "LMCACHE_"))}
    return {**base, **SIDECAR_ENV, **env}


def wait_ready(admin: SidecarAdmin, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not admin.ready():
        assert proc.poll() is None, f"sidecar exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"sidecar not ready:\n{log.read_text()[-4000:]}"
        time.sleep(0.25)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 40.0, *, group: bool = True) -> None:
    """SIGTERM (the group, or only the leader, which stops its children in order), then SIGKILL the group."""
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def keyed_node(node_factory: NodeFactory, key_file: tuple[str, Path]) -> Iterator[NodeProcess]:
    _, path = key_file
    yield node_factory(capacity="256MiB", args=["--auth-key-file", str(path), "--control-listen", "127.0.0.1:0"])


def check_env_and_traffic(endpoints: SidecarEndpoints, node: NodeProcess, key: str) -> None:
    with urllib.request.urlopen(f"{endpoints.admin_url}/env", timeout=10) as resp:
        body = resp.read().decode()
    env = json.loads(body)
    assert env, "/env answered nothing: the check would prove nothing"
    assert "MEMKV_AUTH_KEY" not in env, "the key is in the sidecar's environment"
    assert key.lower() not in body.lower(), "the hex key is readable on the admin port"
    assert env.get("MEMKV_AUTH_KEY_FILE"), "the sidecar was given the key as a file"

    from lmcache_memkv.sidecar.workload import Workload, WorkloadConfig

    admin = SidecarAdmin(endpoints.admin_url)
    with Workload(endpoints, WorkloadConfig(seed=83, l1_headroom=0.75)) as wl:
        stored = wl.store(2, 1024)
        assert stored.ok, stored
        admin.wait_store_drained(60)
    keys = int(node.client(key=bytes.fromhex(key)).stats()["keys"])
    assert keys >= stored.chunks_stored > 0, (keys, stored.chunks_stored)


@pytest.mark.slow
def test_worker_recipe_sidecar_keeps_the_key_off_the_admin_port(
    keyed_node: NodeProcess, key_file: tuple[str, Path], tmp_path: Path
) -> None:
    key, path = key_file
    endpoints = SidecarEndpoints("127.0.0.1", free_loopback_port(), free_loopback_port())
    argv = recipe_argv(endpoints.rpc_port, endpoints.http_port, f"memkv-test-{os.getpid()}-{time.monotonic_ns()}")
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=recipe_env(keyed_node, path, tmp_path), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(SidecarAdmin(endpoints.admin_url), proc, log)
        check_env_and_traffic(endpoints, keyed_node, key)
    finally:
        stop(proc)


@pytest.mark.slow
def test_launch_script_sidecar_keeps_the_key_off_the_admin_port(
    keyed_node: NodeProcess, key_file: tuple[str, Path], tmp_path: Path
) -> None:
    """Even given MEMKV_AUTH_KEY (the old way), the script's sidecar holds only a key file."""
    key, _ = key_file
    endpoints = SidecarEndpoints("127.0.0.1", free_loopback_port(), free_loopback_port())
    lmcache = tmp_path / "lmcache"
    lmcache.write_text("#!/bin/sh\nexec " + " ".join(lmcache_command()) + ' "$@"\n')
    lmcache.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MEMKV_", "LMCACHE_"))}
    env = {
        **base,
        **SIDECAR_ENV,
        "MEMKV_SERVERS": str(keyed_node.control),
        "MEMKV_AUTH_KEY": key,
        "LMCACHE_BIN": str(lmcache),
        "LMCACHE_PORT": str(endpoints.rpc_port),
        "LMCACHE_HTTP_PORT": str(endpoints.http_port),
        "LMCACHE_L1_SIZE_GB": L1_GB,
        "STOP_TIMEOUT_S": "20",
    }
    log = tmp_path / "launch.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", str(LAUNCH), "--", "sleep", "600"], env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(SidecarAdmin(endpoints.admin_url), proc, log)
        check_env_and_traffic(endpoints, keyed_node, key)
    finally:
        stop(proc, group=False)
    assert "lmcache server exited" not in log.read_text(), log.read_text()[-4000:]
    assert "moved MEMKV_AUTH_KEY into a private file" in log.read_text()
