"""The control plane's link to its data plane: the client, the shm and gRPC step transports, reconnects."""
