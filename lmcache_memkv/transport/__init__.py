"""Thin transports that move frames and value bytes: TCP sockets and RDMA verbs."""
