"""Operations: metrics, telemetry, auth, TLS, readiness, graceful shutdown, interceptors."""
