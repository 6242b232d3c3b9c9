"""Composition root: the `retrainer` CLI, settings loading, logging set-up, process wiring."""

__version__ = "0.1.0"
