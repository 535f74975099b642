"""lmcache-memkv: a cluster memory tier for LMCache.

Importing this package must stay cheap: it is imported by the ``.pth`` hook in
every Python process of the environment, so nothing heavy is imported here.
"""

__version__ = "0.1.0"
