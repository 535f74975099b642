"""The node's garbage collector: a full collection walks every live object, the index's entries
included, so its pause grows with the values a node holds (64-74 ms mid-lookup at 96k values on
this machine). Start-up objects are frozen and collections come less often: a node storing and
looking up 64k values makes young collections (cycles are still collected) and no full one."""

from __future__ import annotations

from nodeproc import NodeFactory

from lmcache_memkv.wire.constants import Status

GC = "python_gc_collections_total"


def test_a_busy_node_collects_young_objects_and_makes_no_full_collection(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="128MiB")
    young, full = node.metric(GC, generation="0"), node.metric(GC, generation="2")
    batches = [[b"gc/%04d/%02d" % (b, i) for i in range(64)] for b in range(1000)]
    with node.client() as c:
        for keys in batches:
            assert c.put(keys, [b"v" * 128] * len(keys)) == [Status.OK] * len(keys)
        for keys in batches:
            assert list(c.lookup(keys, lease_ttl_s=30).statuses) == [Status.OK] * len(keys)
    assert node.metric(GC, generation="0") > young
    assert node.metric(GC, generation="2") == full
