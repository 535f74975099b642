"""Limits a decoder enforces before it allocates anything."""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_memkv.wire.constants import MAX_KEY_LEN


@dataclass(frozen=True)
class Limits:
    max_meta_len: int = 1 << 20
    max_batch: int = 1024
    max_value_len: int = 1 << 30
    max_key_len: int = MAX_KEY_LEN
    max_list_limit: int = 10_000
    max_payload_len: int = 1 << 30  # value bytes one frame may carry (--max-frame-payload)

    def __post_init__(self) -> None:
        if not 0 < self.max_key_len <= MAX_KEY_LEN:
            raise ValueError(f"max_key_len must be in 1..{MAX_KEY_LEN}, got {self.max_key_len}")
        for name in ("max_meta_len", "max_batch", "max_value_len", "max_list_limit", "max_payload_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


DEFAULT_LIMITS = Limits()
