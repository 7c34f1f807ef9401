"""The flow lets go of what Prefect keeps of each finished task for a flow run.

Prefect keeps, for a whole flow run, a copy of each task's state keyed by the
id of each part of the task's result, and a record of each task run's assets;
a 10,000-item job would hold tens of thousands. These tests run real flows on
the session's Prefect server.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prefect import flow, task
from prefect.context import FlowRunContext

from imageopt.services import wait_for_history
from imageopt.window import forget_assets, forget_results


@dataclass(frozen=True)
class Made:
    name: str
    size: int


@task
def make(n: int) -> tuple[str, float]:
    return f"prediction-{n}", n + 0.5


@task
def use(name: str, at: float) -> Made:
    return Made(f"made from {name}", 1000 + int(at))


def test_forgetting_a_result_drops_its_links_and_those_of_its_parts(prefect_api):
    def links() -> int:
        return len(FlowRunContext.get().run_results)

    @flow
    def links_left() -> list[int]:
        left = []
        pair = make(1)
        left.append(links())  # the pair, its name, its float
        forget_results(pair, parts=False)
        left.append(links())  # the name and the float
        forget_results(pair)
        left.append(links())
        made = use("x", 2.5)
        left.append(links())  # the dataclass, its name, its size
        forget_results(made)
        left.append(links())
        return left

    assert links_left() == [3, 2, 0, 3, 0]


def test_a_poll_stays_linked_to_its_create(prefect_api):
    @flow
    def chained() -> str:
        pair = make.submit(7).result()
        made = use.submit(*pair)
        # As the optimize-job flow does: the pair goes at once, its parts
        # once the task they were given to has started.
        forget_results(pair, parts=False)
        result = made.result()
        forget_results(result)
        return str(FlowRunContext.get().flow_run.id)

    flow_run_id = chained()

    wait_for_history(flow_run_id)
    runs = httpx.post(
        f"{prefect_api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
        timeout=30,
    ).json()
    by_name = {run["name"].split("-")[0]: run for run in runs}
    assert by_name["use"]["task_inputs"]["name"] == [
        {"input_type": "task_run", "id": by_name["make"]["id"]}
    ]


def test_forgetting_a_finished_task_runs_assets_drops_its_empty_record(prefect_api):
    @flow
    def records_left() -> list[int]:
        left = []
        future = make.submit(1)
        future.wait()
        left.append(len(FlowRunContext.get().task_run_assets))
        forget_assets(future.task_run_id)
        left.append(len(FlowRunContext.get().task_run_assets))
        return left

    assert records_left() == [1, 0]
