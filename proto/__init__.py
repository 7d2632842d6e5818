"""What both planes and the client share: the .proto sources and their generated stubs
(nanoplane/v1), the step-plan dataclasses and codec (step), and small start-up helpers
(options: flags and environment; logs: structlog set-up)."""
