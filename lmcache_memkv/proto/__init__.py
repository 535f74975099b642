"""The gRPC contract: modules generated from proto/memkv/v1 (see generate.py)."""
