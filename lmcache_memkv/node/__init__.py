"""The MemKV node: arena, index, leases and the data-plane server."""
