"""Which cluster a client belongs to, checked on every answer that names one.

Nodes put their ``--cluster-id`` in ``ResponseHeader.cluster_id``. A client configured with an
id refuses answers naming another; a client without one pins the first id it sees and then
refuses others, so a sidecar whose server list mixes two clusters cannot merge their views. An
answer naming no cluster (a node without ``--cluster-id``) is accepted.
"""

from __future__ import annotations

import threading


class WrongCluster(ValueError):
    """An answer from a node of another cluster."""


class ClusterIdentity:
    def __init__(self, expected: str | None = None) -> None:
        self._id = expected or None
        self.configured = self._id is not None
        self._lock = threading.Lock()

    @property
    def cluster_id(self) -> str | None:
        """The configured or pinned id (None: none seen yet)."""
        with self._lock:
            return self._id

    def check(self, cluster_id: str, source: str) -> None:
        """Return if an answer naming ``cluster_id`` (from ``source``) belongs to this client's
        cluster, pinning it if none is known yet; else raise WrongCluster."""
        if not cluster_id:
            return
        with self._lock:
            if self._id is None:
                self._id = cluster_id
                return
            if cluster_id == self._id:
                return
            how = "configured" if self.configured else "pinned from the first answer"
        raise WrongCluster(f"{source} belongs to cluster {cluster_id!r}, this client's cluster is {self._id!r} ({how})")
