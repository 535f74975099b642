"""The MemKV L2 adapter that runs inside ``lmcache server``.

Nothing is imported here: LMCache imports ``memkv_l2_adapter`` only when an adapter of
type ``memkv`` is requested (see ``lmcache_memkv.server_ext.autoload``).
"""
