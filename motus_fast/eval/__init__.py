"""Closed-loop evaluation in simulated benchmarks, and the `motus-fast eval <benchmark>` command."""

from __future__ import annotations


def register(sub) -> None:
    """Add `eval` with one sub-command per benchmark (each benchmark module has add_parser(eval_subparsers))."""
    from motus_fast.eval import metaworld

    p = sub.add_parser("eval", help="closed-loop evaluation of a policy in simulation")
    benchmarks = p.add_subparsers(dest="benchmark", required=True)
    metaworld.add_parser(benchmarks)
