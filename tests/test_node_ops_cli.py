"""Operator mistakes fail loudly, and the command line behaves as fleets expect: duplicate node
ids, a capacity the host cannot back, SIGTERM during the pre-fault, --version/-h, MEMKV_*
variables and the node config file, flag errors, status at 80 columns, TLS without a CA."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from nodeproc import NodeFactory, memkv_command, node_env

from lmcache_memkv.node.arena import HEADROOM, check_capacity, mem_available

GiB = 1 << 30


def memkv(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*memkv_command(), *args], env=node_env(env), capture_output=True, text=True, timeout=timeout
    )


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------------- misconfiguration


def test_duplicate_node_id_exits_naming_the_clash(node_factory: NodeFactory) -> None:
    seed = node_factory(args=["--node-id", "twin"])
    out = memkv(
        "node", "--listen", "127.0.0.1:0", "--capacity", "16MiB", "--node-id", "twin", "--seed", str(seed.control)
    )
    assert out.returncode == 1, out.stderr
    assert "node id 'twin' is already taken" in out.stderr and "--node-id" in out.stderr
    assert " ready " not in out.stdout  # it never served as a cluster of its own
    assert seed.alive()


def test_capacity_above_mem_available_is_refused_before_allocating() -> None:
    available = mem_available()
    if available is None:
        pytest.skip("no MemAvailable in /proc/meminfo")
    too_much = available + GiB
    out = memkv("node", "--listen", "127.0.0.1:0", "--capacity", str(too_much))
    assert out.returncode == 2, out.stderr
    message = one_line(out.stderr)
    assert "--capacity" in message and "MemAvailable is" in message and "use at most --capacity" in message
    # An absurd size gets the same explanation, not a bare "[Errno 12]".
    out = memkv("node", "--listen", "127.0.0.1:0", "--capacity", "10TB")
    assert out.returncode == 2 and "MemAvailable is" in out.stderr and "Errno" not in out.stderr


def test_check_capacity_leaves_headroom() -> None:
    check_capacity(GiB, available=2 * GiB)
    with pytest.raises(ValueError, match=r"--capacity 2\.0 GiB .* MemAvailable is 2\.0 GiB"):
        check_capacity(2 * GiB, available=2 * GiB)
    with pytest.raises(ValueError):
        check_capacity(2 * GiB - HEADROOM + 1, available=2 * GiB)


def test_sigterm_during_the_prefault_stops_it(tmp_path: Path) -> None:
    # Faulting in 2 GiB takes seconds here (about 4 s per GiB measured on the 2-core test box),
    # and the node must stop between chunks instead of finishing it first.
    size = 2 * GiB
    available = mem_available()
    if available is not None and available < size + 4 * GiB:
        pytest.skip("not enough free memory for a 2 GiB arena")
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*memkv_command(), "node", "--listen", "127.0.0.1:0", "--capacity", "2GiB"],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=node_env(),
        )
    try:
        deadline = time.monotonic() + 30
        while "faulting in the" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "faulting in the 2.0 GiB arena" in log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stdout is not None
        assert " ready " not in proc.stdout.read().decode()
        assert "signalled while faulting in the arena (stopped after faulting in" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# ---------------------------------------------------------------------- command line


def test_version_and_short_help_everywhere() -> None:
    out = memkv("--version")
    assert out.returncode == 0 and re.fullmatch(r"memkv \S+ \(data-plane protocol \d+\)\n", out.stdout)
    for command in ([], ["node"], ["status"], ["stats"], ["keygen"], ["demo"], ["bench"]):
        out = memkv(*command, "-h", env={"COLUMNS": "100"})
        assert out.returncode == 0, (command, out.stderr)
        assert "Usage: memkv" in out.stdout
        assert "<bool>" not in out.stdout, out.stdout  # flags take no value: no metavar


def test_log_level_typo_is_one_line() -> None:
    out = memkv("node", "--capacity", "16MiB", "--log-level", "infoo")
    assert out.returncode == 2
    assert one_line(out.stderr) == "memkv node: --log-level: 'infoo' is not one of debug, info, warning, error"


@pytest.mark.parametrize("flag", ["--listen", "--seed", "--control-listen", "--metrics-listen"])
def test_url_scheme_in_an_endpoint_is_refused(flag: str) -> None:
    out = memkv("node", "--capacity", "16MiB", flag, "tcp://127.0.0.1:9900")
    assert out.returncode == 2
    assert f"{flag}: 'tcp://127.0.0.1:9900' has a URL scheme; give HOST:PORT without 'tcp://'" in one_line(out.stderr)


def test_metrics_port_clash_names_the_flag() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        out = memkv("node", "--listen", "127.0.0.1:0", "--capacity", "16MiB", "--metrics-listen", f"127.0.0.1:{port}")
        assert out.returncode == 1
        assert f"--metrics-listen 127.0.0.1:{port}: cannot bind: Address already in use" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        taken.close()


def test_every_node_flag_has_an_environment_variable() -> None:
    out = memkv("node", "--help", env={"COLUMNS": "250"})
    flags = set(re.findall(r"│ (--[a-z-]+)", out.stdout)) - {"--help", "--auth-key-file"}
    assert "--drain-timeout" in flags and "--seed" in flags
    for flag in flags:
        var = "MEMKV_NODE_CONFIG" if flag == "--config" else "MEMKV_" + flag[2:].replace("-", "_").upper()
        assert var in out.stdout, flag


def test_settings_precedence_file_then_environment_then_flags(node_factory: NodeFactory, tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node-id: from-file\ncapacity: 24MiB\nmax_batch: 16\n")
    # The file alone.
    node = node_factory(args=["--config", str(config)], capacity="16MiB")
    assert node.node_id == "from-file"
    assert node.metric("memkv_node_arena_capacity_bytes", node="from-file") == 16 << 20  # the flag beats the file
    node.stop()
    # MEMKV_NODE_CONFIG names the file; the environment beats the file.
    node = node_factory(env={"MEMKV_NODE_CONFIG": str(config), "MEMKV_NODE_ID": "from-env"})
    assert node.node_id == "from-env"
    node.stop()
    # A flag beats both.
    node = node_factory(env={"MEMKV_NODE_CONFIG": str(config), "MEMKV_NODE_ID": "from-env"}, args=["--node-id", "flag"])
    assert node.node_id == "flag"


def test_setting_errors_name_the_field_and_its_source(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("capacity: 12 parsecs\n")
    out = memkv("node", "--config", str(bad))
    assert out.returncode == 2
    assert "--capacity" in out.stderr and "invalid size unit" in out.stderr and f"(set in {bad} (capacity))" in out.stderr
    bad.write_text("capcity: 1GiB\n")
    out = memkv("node", "--config", str(bad))
    assert out.returncode == 2 and f"--config {bad}: unknown setting 'capcity'" in one_line(out.stderr)
    bad.write_text("max-batch: lots\n")
    out = memkv("node", "--config", str(bad))
    assert out.returncode == 2 and f"{bad} (max-batch): 'lots' is not a valid integer" in one_line(out.stderr)
    out = memkv("node", "--capacity", "16MiB", env={"MEMKV_MAX_BATCH": "0"})
    assert out.returncode == 2
    assert one_line(out.stderr) == "memkv node: --max-batch must be positive, got 0 (set by MEMKV_MAX_BATCH)"
    out = memkv("node", "--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "--config: cannot read" in one_line(out.stderr)


def test_seed_environment_variable_takes_a_comma_separated_list(node_factory: NodeFactory) -> None:
    a = node_factory(args=["--node-id", "a"])
    b = node_factory(args=["--node-id", "b"], env={"MEMKV_SEED": f"127.0.0.1:1,{a.control}"})
    out = memkv("status", "--json", "--servers", str(b.control))
    assert out.returncode == 0, out.stderr
    assert '"node_id": "a"' in out.stdout


def test_status_table_fits_80_columns(node_factory: NodeFactory) -> None:
    node = node_factory(args=["--node-id", "memory-host-with-a-long-name-0001"])
    out = memkv("status", "--servers", str(node.control), env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 80, out.stdout
    for text in (node.data, str(node.control), "ALIVE", "1 of 1 members up"):
        assert text in out.stdout  # whole, not cut or folded mid-address
    assert "memory-host-with" in out.stdout and "…" not in out.stdout


def test_tls_without_a_ca_says_what_to_set(node_factory: NodeFactory, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from test_control_auth import _self_signed

    cert, key = _self_signed(tmp_path)
    node = node_factory(args=["--tls-cert", cert, "--tls-key", key])
    env = {k: "" for k in ("MEMKV_TLS_CA", "MEMKV_AUTH_KEY") if k in os.environ}
    out = memkv("status", "--servers", str(node.control), "--timeout", "3", env=env)
    assert out.returncode == 1
    assert "set MEMKV_TLS_CA" in out.stderr, out.stderr
    out = memkv("status", "--servers", str(node.control), env={**env, "MEMKV_TLS_CA": cert})
    assert out.returncode == 0, out.stderr


def test_prefault_stops_at_once_when_asked_and_falls_back_without_madvise(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmcache_memkv.node import arena as arena_mod

    stop = arena_mod.StopFlag()
    stop.set()
    with pytest.raises(arena_mod.PrefaultInterrupted, match="after faulting in 0 of"):
        arena_mod.Arena(256 << 20, stop)
    # A kernel without MADV_POPULATE_WRITE answers EINVAL: the arena touches every page instead.
    monkeypatch.setattr(arena_mod, "_MADV_POPULATE_WRITE", 0x7FFF)
    a = arena_mod.Arena(8 << 20, arena_mod.StopFlag())
    try:
        assert a.capacity == 8 << 20 and a.alloc(4096) == 0
        assert bytes(a.view[:16]) == bytes(16)
    finally:
        a.close()
