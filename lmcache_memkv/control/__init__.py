"""The node's control plane: gRPC membership, statistics and session services."""
