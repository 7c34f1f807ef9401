"""imageopt's benchmarks: ``python -m bench NAME`` or ``python -m bench --quick``.

Each benchmark is a module of this package with a ``run(quick: bool)``
function returning (or yielding) result dicts; each result is printed as one JSON line
with a ``bench`` key. Comparisons run side by side in one invocation so that
the machine's drift affects both sides alike.
"""

BENCHMARKS = (
    "optimizer",
    "ceiling",
    "fairness",
    "history",
    "scaling",
    "throughput",
)
