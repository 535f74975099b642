"""RDMA (verbs) support: device discovery now, imported lazily so TCP-only hosts never load pyverbs.

This machine's kernel has no InfiniBand support, so everything here degrades to "no
devices" and ``MEMKV_TRANSPORT=auto`` runs over TCP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger("memkv.rdma")


def rdma_devices(wanted: Sequence[str] = ()) -> list[str]:
    """Names of usable RDMA devices (restricted to ``wanted`` when given); [] without pyverbs."""
    try:
        import pyverbs.device as d
    except ImportError:
        return []
    try:
        names = [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name) for dev in d.get_device_list()]
    except Exception as exc:  # pyverbs raises its own errors when the kernel lacks verbs
        log.debug("no RDMA devices: %s", exc)
        return []
    if wanted:
        names = [n for n in names if n in set(wanted)]
    return names
