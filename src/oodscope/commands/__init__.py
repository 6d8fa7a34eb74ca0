"""Subcommands of the ``oodscope`` command that ship a detector: fit, score, serve."""
