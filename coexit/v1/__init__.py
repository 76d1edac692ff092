"""Generated protobuf/gRPC stubs for package coexit.v1 (python -m proto.gen)."""
