"""Wire keys: every ObjectKey field, reversible for LIST, digested past the wire cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmcache_memkv.adapter.keys import KeyFields, decode_key, encode_key, encode_keys, model_prefix
from lmcache_memkv.wire.constants import MAX_KEY_LEN

_text = st.text(st.characters(blacklist_characters="@/\\\x00", blacklist_categories=("Cs",)), max_size=40)
fields = st.builds(
    KeyFields,
    model_name=_text,
    kv_rank=st.integers(0, 2**32),
    object_group_id=st.integers(0, 1000),
    chunk_hash=st.binary(min_size=1, max_size=32),
    cache_salt=_text,
)
prefixes = st.sampled_from(["", "prod/", "ns:a#"])


@given(prefixes, fields)
def test_round_trip(prefix: str, f: KeyFields) -> None:
    wire = encode_key(prefix, f)
    assert len(wire) <= MAX_KEY_LEN
    assert decode_key(prefix, wire) == f


@given(prefixes, st.lists(fields, max_size=5), st.integers(0, 600))
def test_batch_encoding_is_encode_key(prefix: str, batch: list[KeyFields], pad: int) -> None:
    # Long model names too, so keys past the wire cap take the digest path in both.
    batch = [f._replace(model_name=f.model_name + "m" * pad) for f in batch]
    assert encode_keys(prefix, batch) == [encode_key(prefix, f) for f in batch]


@given(prefixes, fields, fields)
def test_distinct_fields_distinct_keys(prefix: str, a: KeyFields, b: KeyFields) -> None:
    if a != b:
        assert encode_key(prefix, a) != encode_key(prefix, b)


def test_every_field_matters() -> None:
    base = KeyFields("m", 1, 0, b"\x01\x02", "")
    variants = [base._replace(model_name="n"), base._replace(kv_rank=2), base._replace(object_group_id=1),
                base._replace(chunk_hash=b"\x01\x03"), base._replace(cache_salt="u1")]
    keys = {encode_key("", v) for v in [base, *variants]}
    assert len(keys) == 6


def test_long_keys_collapse_to_stable_digest() -> None:
    f = KeyFields("m" * 600, 1, 0, b"\xff" * 32, "")
    wire = encode_key("p/", f)
    assert wire.startswith(b"p/#") and len(wire) <= MAX_KEY_LEN
    assert wire == encode_key("p/", f)
    assert decode_key("p/", wire) is None  # not listable, by design


def test_model_prefix_selects_model() -> None:
    a = encode_key("x/", KeyFields("llama", 1, 0, b"\x01", ""))
    b = encode_key("x/", KeyFields("llama2", 1, 0, b"\x01", ""))
    assert a.startswith(model_prefix("x/", "llama"))
    assert not b.startswith(model_prefix("x/", "llama"))


@given(st.binary(max_size=100))
def test_decode_garbage_is_none_or_fields(data: bytes) -> None:
    out = decode_key("", data)
    assert out is None or isinstance(out, KeyFields)
