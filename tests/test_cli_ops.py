"""``memkv stats``, ``memkv bench`` and ``memkv keygen`` against a real node (with an auth key).

Every command runs as a subprocess, the way an operator runs it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from lmcache_memkv.client import NodeClient
from lmcache_memkv.node.launcher import NodeProcess, memkv_command, node_env

KEY = bytes(range(32))


def memkv(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*memkv_command(), *args], capture_output=True, text=True, env=node_env(env), timeout=timeout)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess.start(
        capacity="128MiB", env={"MEMKV_AUTH_KEY": KEY.hex()}, log_dir=tmp_path_factory.mktemp("node")
    ) as started:
        yield started


@pytest.fixture
def cluster_env(node: NodeProcess) -> dict[str, str]:
    assert node.control is not None
    return {"MEMKV_SERVERS": node.control, "MEMKV_AUTH_KEY": KEY.hex()}


def _node_row(doc: dict, node: NodeProcess) -> dict:
    (row,) = [n for n in doc["nodes"] if n["node_id"] == node.node_id]
    return row


# ---------------------------------------------------------------------------- stats


def test_stats_json_and_table_move_after_puts(node: NodeProcess, cluster_env: dict[str, str]) -> None:
    first = memkv("stats", "--json", env=cluster_env)
    assert first.returncode == 0, first.stderr
    before = _node_row(json.loads(first.stdout), node)
    assert before["state"] == "ALIVE" and before["capacity_bytes"] == 128 << 20

    keys = [f"cli-stats-{i}".encode() for i in range(10)]
    with NodeClient(node.data, key=KEY) as client:
        client.put(keys, [bytes([i]) * 4096 for i in range(10)])
        client.get_into([keys[0], b"cli-stats-absent"], [bytearray(4096), bytearray(4096)])

    second = memkv("stats", "--json", env=cluster_env)
    assert second.returncode == 0, second.stderr
    doc = json.loads(second.stdout)
    after = _node_row(doc, node)
    assert after["keys"] == before["keys"] + 10
    assert after["used_bytes"] >= before["used_bytes"] + 10 * 4096
    assert (after["hits"], after["misses"]) == (before["hits"] + 1, before["misses"] + 1)
    assert after["ops_total"] > before["ops_total"]
    assert doc["members_up"] == 1 and doc["total"]["keys"] == after["keys"]

    table = memkv("stats", env=cluster_env)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if node.node_id in line)
    assert "ALIVE" in row and f" {after['keys']} " in row
    assert "1 of 1 members up" in table.stdout and "cluster" in table.stdout
    for column in ("keys", "used / capacity", "hit ratio", "ops/s", "evictions", "leases"):
        assert column in table.stdout


def test_stats_watch_refreshes_until_sigint(cluster_env: dict[str, str]) -> None:
    for extra in (["--json"], []):
        proc = subprocess.Popen(
            [*memkv_command(), "stats", "--watch", "--interval", "0.3", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=node_env(cluster_env),
        )
        try:
            time.sleep(3.0)
            assert proc.poll() is None, proc.communicate()[1]
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        if extra:
            lines = [json.loads(line) for line in out.splitlines() if line.strip()]
            assert len(lines) >= 3 and all(line["members_up"] == 1 for line in lines)  # refreshed
        else:
            assert "MemKV cluster stats" in out and "Ctrl-C to stop" in out


def test_stats_with_auth_key_file_and_without_key(node: NodeProcess, tmp_path: Path) -> None:
    assert node.control is not None
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex() + "\n")
    ok = memkv("stats", "--json", "--servers", node.control, "--auth-key-file", str(key_file))
    assert ok.returncode == 0, ok.stderr
    refused = memkv("stats", "--servers", node.control)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "UNAUTHENTICATED" in refused.stderr


@pytest.mark.parametrize("command", ["stats", "bench"])
def test_unreachable_servers_give_one_error_line(command: str) -> None:
    started = time.monotonic()
    out = memkv(command, "--servers", "127.0.0.1:1,127.0.0.1:2", "--json")
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"memkv {command}: ") and "127.0.0.1:1" in out.stderr and "127.0.0.1:2" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("command", ["stats", "bench"])
@pytest.mark.parametrize("servers", ["", "no-port", "host:99999"])
def test_malformed_servers_are_a_usage_error(command: str, servers: str) -> None:
    out = memkv(command, "--servers", servers)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--servers" in out.stderr, out.stderr


# ---------------------------------------------------------------------------- bench


def test_bench_small_verifies_every_key(node: NodeProcess, cluster_env: dict[str, str]) -> None:
    sizes = ["--value-size", "64KiB", "--keys", "8", "--in-flight", "2", "--rounds", "2", "--warmup-rounds", "1"]
    out = memkv("bench", *sizes, "--json", env=cluster_env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["ok"] is True
    assert doc["keys_checked"] == doc["keys_verified"] == 16  # the last round: 2 tasks x 8 keys
    assert doc["store_gb_s"] > 0 and doc["load_gb_s"] > 0 and doc["lookup_keys_s"] > 0
    for op in doc["operations"].values():
        assert op["total_success"] == op["total_keys"] == 32

    table = memkv("bench", *sizes, env=cluster_env, timeout=180)
    assert table.returncode == 0, table.stderr[-3000:]
    text = table.stdout
    assert "lmcache bench l2 on 1 MemKV node" in text
    for row in ("store", "lookup", "load"):
        assert re.search(rf"^\W*{row}\b.*32/32", text, re.M), text
    assert re.search(r"byte-exact check.*16/16", text), text
    assert "GB/s" in text


def test_bench_rejects_bad_sizes(cluster_env: dict[str, str]) -> None:
    out = memkv("bench", "--value-size", "1000B", env=cluster_env)
    assert out.returncode == 2 and "--value-size" in out.stderr


@pytest.mark.parametrize(("ours", "theirs"), [(None, "1"), ("3", "3")])
def test_bench_runs_torch_on_one_thread_unless_told(monkeypatch: pytest.MonkeyPatch, ours: str | None, theirs: str) -> None:
    """The bench's torch spins OpenMP workers through each timed load round: one thread by
    default, an operator's OMP_NUM_THREADS kept."""
    from lmcache_memkv.cli.bench import _run

    if ours is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", ours)
    code, out = _run([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"], 30, False)
    assert (code, out) == (0, theirs)


# ---------------------------------------------------------------------------- keygen and help


def test_keygen_prints_fresh_64_hex_keys() -> None:
    a, b = memkv("keygen"), memkv("keygen")
    assert a.returncode == b.returncode == 0
    assert re.fullmatch(r"[0-9a-f]{64}\n", a.stdout) and re.fullmatch(r"[0-9a-f]{64}\n", b.stdout)
    assert a.stdout != b.stdout


def test_top_level_help_is_fast_and_lists_the_commands() -> None:
    started = time.monotonic()
    out = memkv("--help")
    assert out.returncode == 0
    for command in ("demo", "node", "keygen", "status", "stats", "bench"):
        assert re.search(rf"^\W*{command}\s", out.stdout, re.M), out.stdout
    assert time.monotonic() - started < 5  # no torch, no LMCache behind --help
    for command in ("stats", "bench"):
        sub = memkv(command, "--help")
        assert sub.returncode == 0 and "Example: memkv" in sub.stdout


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys, lmcache_memkv.cli.main; print(sorted(m for m in ('torch', 'lmcache', 'grpc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=node_env(), timeout=30)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
