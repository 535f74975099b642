"""The MemKV data-plane wire protocol, sans-IO: pure encode/decode and state.

Nothing in this package touches a socket; ``lmcache_memkv.transport`` does.
"""
