"""Benchmarks (not tests): each prints `RESULT <name> ratio=<x> goal=<y> <pass|FAIL>`."""
