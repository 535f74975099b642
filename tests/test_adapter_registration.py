"""{"type": "memkv"} works in an unmodified LMCache, and the hook costs other processes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

ENV = dict(os.environ, LMCACHE_TRACK_USAGE="false", LMCACHE_DISABLE_BANNER="1")


def _py(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_memkv_is_a_registered_adapter_type() -> None:
    out = _py(
        "from lmcache.v1.distributed.l2_adapters.config import get_registered_l2_adapter_types as g;"
        "print('memkv' in g())"
    )
    assert out == "True"


def test_lmcache_server_help_lists_memkv() -> None:
    lmcache = os.path.join(os.path.dirname(sys.executable), "lmcache")
    out = subprocess.run([lmcache, "server", "--help"], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = out.stdout[out.stdout.index("Supported adapters are:") :]
    assert "memkv" in listed.split("]")[0]


def test_config_parses_through_lmcache() -> None:
    out = _py(
        "import argparse, json;"
        "from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config;"
        "p = add_l2_adapters_args(argparse.ArgumentParser());"
        "a = p.parse_args(['--l2-adapter', json.dumps({'type': 'memkv', 'servers': '127.0.0.1:9901', 'replicas': 2})]);"
        "c = parse_args_to_l2_adapters_config(a).adapters[0];"
        "print(type(c).__name__, c.settings.replicas)"
    )
    assert out == "MemKVL2AdapterConfig 2"


def test_bad_config_error_names_the_field() -> None:
    code = (
        "import argparse, json;"
        "from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config;"
        "p = add_l2_adapters_args(argparse.ArgumentParser());"
        "a = p.parse_args(['--l2-adapter', json.dumps({'type': 'memkv', 'servers': 'h:1', 'replicas': 'x'})]);"
        "parse_args_to_l2_adapters_config(a)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "'replicas' must be an integer in 1..8" in out.stderr


def test_hook_imports_nothing_heavy() -> None:
    # The .pth hook runs in every interpreter of the environment: it must not pull in LMCache,
    # torch, grpc or our adapter until LMCache's own adapter registry is imported.
    out = _py(
        "import sys; heavy = [m for m in ('lmcache', 'torch', 'grpc', 'lmcache_memkv.adapter.memkv_l2_adapter')"
        " if m in sys.modules]; print(heavy, 'lmcache_memkv.server_ext.autoload' in sys.modules)"
    )
    assert out == "[] True"


def test_plugin_form_resolves_our_classes() -> None:
    out = _py(
        "import importlib;"
        "from lmcache.v1.distributed.l2_adapters.plugin_l2_adapter import PluginL2AdapterConfig, _resolve_config_class;"
        "c = PluginL2AdapterConfig.from_dict({'module_path': 'lmcache_memkv.adapter.memkv_l2_adapter', 'class_name': 'MemKVL2Adapter'});"
        "m = importlib.import_module(c.module_path);"
        "print(_resolve_config_class(m, c, m.MemKVL2Adapter).__name__)"
    )
    assert out == "MemKVL2AdapterConfig"
