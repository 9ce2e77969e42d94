"""Benchmarks: lrpjax's speed and numerical fidelity, measured (never asserted)."""
