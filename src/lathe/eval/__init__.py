"""Evaluation: metrics and multiple-choice benchmarks."""
