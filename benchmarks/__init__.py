"""Benchmarks of the step executor, kept out of the runtime packages.

Nothing in `executor` imports this package except the `executor bench` verb, lazily, so a
worker never loads benchmark code. Each module is one benchmark and runs on its own with
`python -m benchmarks.<name>`; `executor bench` (or `python -m benchmarks`) runs a chosen set
of them side by side in alternating rounds. See docs/benchmarks.md.
"""
