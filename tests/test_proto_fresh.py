"""The committed gRPC modules match what proto/memkv/v1/*.proto generates today."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from lmcache_memkv.proto import generate


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".pyi")
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    assert generate.proto_files(), "no .proto sources found"
    generate.generate(tmp_path)
    fresh = _tree(tmp_path / generate.GENERATED)
    committed = _tree(generate.PACKAGE_DIR / generate.GENERATED)
    hint = "generated code is stale: run `.venv/bin/python -m lmcache_memkv.proto.generate` and commit the result"
    assert sorted(fresh) == sorted(committed), hint
    for name, text in fresh.items():
        assert committed[name] == text, f"{name}: {hint}"


def test_generated_modules_import_under_the_package() -> None:
    from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc, member_pb2

    assert cluster_pb2.JoinRequest(member=member_pb2.Member(node_id="x")).member.node_id == "x"
    assert hasattr(cluster_pb2_grpc, "ClusterStub")
