"""Synthetic tasks with checkable answers, generated locally (no network): the demo and the tests."""
