"""`bkd-edge bench`: quality, latency and memory of several engines in one report.

engines (spec strings) -> runner (one fresh process per engine) -> worker (one row) -> report (MD + PNG).
"""

from .engines import BenchOptions, EngineSpec, parse_engine
from .runner import run_bench

__all__ = ["BenchOptions", "EngineSpec", "parse_engine", "run_bench"]
