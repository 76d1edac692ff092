"""Benchmarks (not tests): each script prints its figures, compared against a baseline in the same run."""
