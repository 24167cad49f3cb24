"""`flowpo bench`: the benchmark runner (runner.py: the grid of training runs, resumable) and its
report (report.py: targets, iterations/time to target, CSV, plots). The names callers use are
re-exported here."""
from flowpo.bench.report import (  # noqa: F401
    REFERENCE, TASKS, Job, collect, discover, first_reach, is_finished, read_jsonl, report, run_dir, run_stats,
    summarize,
)
from flowpo.bench.runner import main, overrides  # noqa: F401
