"""What makes ``{"type": "memkv"}`` work in an unmodified ``lmcache server``.

``autoload`` (run from a ``.pth`` file at interpreter start) registers the adapter module
with LMCache's lazy adapter registry; ``module`` is the optional LMCache server module
(``--server-module``) exposing MemKV status. Keep this package's import cheap.
"""
