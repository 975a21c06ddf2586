"""Micro-benchmarks of the engine itself (cost per step, independent of acceptance)."""
