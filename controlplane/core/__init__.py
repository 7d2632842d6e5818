"""The scheduling core: Sequence, BlockManager, Scheduler and PlanBuilder (pure Python, no I/O)."""
