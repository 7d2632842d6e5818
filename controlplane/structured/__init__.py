"""Structured output in the control plane: grammars (xgrammar) constrain what a sequence may sample.

spec.py reads the request's `structured_output` (no xgrammar); compiler.py compiles it
off the step loop, cached by its text; grammar_state.py holds each sequence's matcher and
fills the plan's allowed-token bitmasks. docs/structured_output.md tells the whole story.
"""
