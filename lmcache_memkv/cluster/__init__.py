"""Client side of a MemKV cluster: the view, HRW placement, replicas and fail-over."""

from lmcache_memkv.cluster.client import ClusterClient
from lmcache_memkv.control.member import Member, State

__all__ = ["ClusterClient", "Member", "State"]
