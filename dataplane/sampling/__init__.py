"""Sampling on the data plane: per-slot parameters, the samplers, penalties and logprobs."""
