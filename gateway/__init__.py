"""The OpenAI-compatible HTTP gateway: a client of the public gRPC API (imports client/ only)."""
