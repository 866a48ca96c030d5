"""Tests of fisherlib.core: the core-space geometry against dense float64 references."""
