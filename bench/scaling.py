"""Scaling: one job of 100, 1,000 and 10,000 items, zero latency, no limits.

Per size, a line with ``items``, ``seconds_per_item``, ``peak_rss_mb`` and
``peak_threads`` of the flow's process: flat per-item cost and bounded
memory and threads are the point.

    python -m bench scaling          # 100, 1,000 and 10,000 items
    python -m bench scaling --quick  # 100 and 1,000
"""

from __future__ import annotations

from bench.harness import environment, run_job, submit_job, tiny_image

SIZES = (100, 1_000, 10_000)
QUICK_SIZES = (100, 1_000)


def run(quick: bool = False) -> list[dict]:
    results = []
    for size in QUICK_SIZES if quick else SIZES:
        with environment("--create-limit", "0", "--read-limit", "0") as env:
            source = str(tiny_image(env.workdir))
            job_id = submit_job(env.conninfo, "Scaling", [source] * size, format="jpeg")
            run = run_job(env, job_id)
            stats = env.provider.stats()
        if run.returncode != 0:
            raise RuntimeError(f"the {size}-item job failed:\n{run.output[-3000:]}")
        results.append(
            {
                "bench": "scaling",
                "items": size,
                "seconds": round(run.seconds, 1),
                "seconds_per_item": round(run.seconds / size, 4),
                "peak_rss_mb": run.peak_rss_mb,
                "peak_threads": run.peak_threads,
                "creates": stats["creates"],
            }
        )

    return results
