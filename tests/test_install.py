"""Installing the package as a user would: a built wheel in fresh virtual environments.

The wheel (and sdist, which the wheel is built from) is made once per session with
``python -m build``. ``-m install`` selects the tests that need it; they create venvs under
/tmp, install from the package index as a user would, and delete the venvs afterwards.
The import guard at the top needs no venv: it runs the node-side commands with lmcache and
torch made unimportable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcache_memkv.node.launcher import parse_ready_line

ROOT = Path(__file__).resolve().parent.parent
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Packages a memory host must not get: torch (and its CUDA wheels) and LMCache.
HEAVY = re.compile(r"^(torch|lmcache|nvidia-.*|triton)$", re.I)

# ----------------------------------------------------------------------------- no venv needed

# Runs a `memkv` command with lmcache and torch unimportable (as on a memory host).
_BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lmcache", "torch"):
            raise ImportError(f"{name} imported on a memory-host path")
        return None
sys.meta_path.insert(0, Block())
for mod in [m for m in sys.modules if m.split(".")[0] in ("lmcache", "torch")]:
    del sys.modules[mod]
from lmcache_memkv.cli.main import main
sys.argv = ["memkv", *sys.argv[1:]]
main()
"""


def _blocked(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_node_side_commands_never_import_lmcache_or_torch(tmp_path: Path) -> None:
    for args in (["--help"], ["node", "--help"], ["status", "--help"], ["stats", "--help"], ["keygen"]):
        proc = _blocked(*args)
        assert proc.returncode == 0, f"memkv {' '.join(args)}: {proc.stderr[-2000:]}"
    key_file = tmp_path / "key"
    key_file.write_text(_blocked("keygen").stdout)
    env = dict(os.environ, MEMKV_AUTH_KEY_FILE=str(key_file))
    env.pop("MEMKV_AUTH_KEY", None)
    node = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED, "node", "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", "--capacity", "32MiB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = node.stdout.readline() if node.stdout else ""
        _, fields = parse_ready_line(line)
        for command in ("status", "stats"):
            proc = subprocess.run(
                [sys.executable, "-c", _BLOCKED, command, "--servers", fields["control"], "--json"],
                capture_output=True, text=True, timeout=60, env=env,
            )  # fmt: skip
            assert proc.returncode == 0, f"memkv {command}: {proc.stderr[-2000:]}"
            assert json.loads(proc.stdout)
    finally:
        node.send_signal(signal.SIGTERM)
        _, err = node.communicate(timeout=30)
    assert node.returncode == 0, err[-2000:]
    assert "imported on a memory-host path" not in err


def test_pth_hook_is_harmless_without_lmcache() -> None:
    code = (
        _BLOCKED.split("from lmcache_memkv.cli.main")[0]
        + "import lmcache_memkv.server_ext.autoload as a\na.install()\nimport json; print(json.dumps(sorted(m for m in sys.modules if m.startswith('lmcache.'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout) == []


# ----------------------------------------------------------------------------- built wheel, fresh venvs


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that points Python at this checkout or its venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MEMKV_")}
    env.update(LMCACHE_TRACK_USAGE="false", LMCACHE_DISABLE_BANNER="1", COLUMNS="200", NO_COLOR="1", TERM="dumb")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist) from ``python -m build`` (the wheel is built from the sdist), once per session."""
    pytest.importorskip("build", reason="pip install -r requirements-dev.txt (build)")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("lmcache_memkv-*.whl")
    (sdist,) = out.glob("lmcache_memkv-*.tar.gz")
    return wheel, sdist


@pytest.fixture
def venv() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="memkv-venv-", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300, env=_clean_env())
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(venv: Path, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(venv / "bin" / args[0]), *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env(**env), cwd="/tmp")


def _pip_install(venv: Path, *specs: str) -> str:
    proc = _run(venv, "pip", "install", "--disable-pip-version-check", *specs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _installed(venv: Path) -> set[str]:
    proc = _run(venv, "pip", "list", "--format", "json", "--disable-pip-version-check")
    assert proc.returncode == 0, proc.stderr
    return {p["name"].lower() for p in json.loads(proc.stdout)}


@pytest.mark.install
def test_wheel_and_sdist_carry_the_license_and_the_split_dependencies(dist: tuple[Path, Path]) -> None:
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    assert "lmcache_memkv.pth" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert any(n.startswith("lmcache_memkv/proto/memkv/") and n.endswith("_pb2.py") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if re.match(r"(lmcache|torch)\b", r)], base
    assert any(re.match(r"lmcache\b.*extra == .sidecar.", r) for r in requires), requires
    assert {"node", "sidecar"} <= set(re.findall(r"^Provides-Extra: (.*)$", metadata, re.M))
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"LICENSE", "pyproject.toml", "README.md", "lmcache_memkv/lmcache_memkv.pth"} <= members
    assert not [m for m in members if "__pycache__" in m or m.startswith(".venv")]


@pytest.mark.install
def test_memory_host_install_has_no_torch_or_lmcache_and_runs_a_node(dist: tuple[Path, Path], venv: Path) -> None:
    wheel, _ = dist
    out = _pip_install(venv, f"{wheel}[node]")
    assert "does not provide the extra" not in out
    heavy = sorted(p for p in _installed(venv) if HEAVY.match(p))
    assert not heavy, f"a memory host got {heavy}"
    assert "lmcache-memkv" in _installed(venv)

    assert _run(venv, "python", "-c", "pass").stderr == "", "the .pth hook must be silent without lmcache"
    help_ = _run(venv, "memkv", "--help", timeout=60)
    assert help_.returncode == 0 and "node" in help_.stdout, help_.stderr
    for command in ("demo", "bench"):  # the sidecar side says which extra it needs, in one line
        proc = _run(venv, "memkv", command, timeout=60)
        assert proc.returncode == 2 and "lmcache-memkv[sidecar]" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    key = _run(venv, "memkv", "keygen", timeout=60).stdout.strip()
    assert HEX64.match(key), key
    key_file = venv / "auth-key"
    key_file.write_text(key)

    node = subprocess.Popen(
        [str(venv / "bin" / "memkv"), "node", "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0",
         "--capacity", "32MiB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env(MEMKV_AUTH_KEY_FILE=str(key_file)),
    )  # fmt: skip
    try:
        line = node.stdout.readline() if node.stdout else ""  # the ready line (pytest-timeout bounds a hang)
        _, fields = parse_ready_line(line)
        status = _run(venv, "memkv", "status", "--servers", fields["control"], "--json", timeout=60,
                      MEMKV_AUTH_KEY_FILE=str(key_file))  # fmt: skip
        assert status.returncode == 0, status.stderr
    finally:
        node.send_signal(signal.SIGTERM)
        _, err = node.communicate(timeout=30)
    assert node.returncode == 0, err[-2000:]


@pytest.mark.install
@pytest.mark.slow_install
@pytest.mark.timeout(1200)  # installs torch and lmcache: about 3.5 minutes on two cores, teardown included
def test_full_install_runs_the_demo(dist: tuple[Path, Path], venv: Path) -> None:
    """torch (the pinned CPU build) + the wheel with its sidecar extra, then `memkv demo` end to end."""
    wheel, _ = dist
    _pip_install(venv, "torch==2.13.0", f"{wheel}[sidecar]")
    assert {"torch", "lmcache", "lmcache-memkv"} <= _installed(venv)
    demo = _run(venv, "memkv", "demo", timeout=900)
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
