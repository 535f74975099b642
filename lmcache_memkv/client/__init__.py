"""Client library for the MemKV data plane."""

from lmcache_memkv.client.node_client import NodeClient

__all__ = ["NodeClient"]
