"""Benchmarks of aetherd, each figure beside a reference measured in the same run.

Run them from the repository root as modules, for example `python -m bench.terminal`;
every one accepts `--quick` for a short smoke run. Results are in docs/performance.md.
"""
