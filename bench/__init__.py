"""Benchmarks of the rebalancer against armsim and Azurite: `python -m bench` (or `make bench`).

Each figure has its own module (audit_cost, time_to_balance, moves, cold_start, steady_state,
memory); every figure is printed as one `bench:` line with a baseline measured in the same run
(see `bench.common.Figure`), then all of them as a table. docs/performance.md has the latest
figures and how to read them.
"""
