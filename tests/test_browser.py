"""The Prefect UI, in a real headless Chromium, shows what the design promises:
every item's task runs by name, and a poll's retries in its state history.

A job runs through the ``optimize-job`` deployment (``deployed`` registers the
project's deployments and runs a worker). The run times its first polls by the
provider's recent predictions, which a prediction made beforehand sets at about
a second; one of the job's images is served slowly, so that its prediction
takes several times that and its poll retries. Chromium is
Debian's ``/usr/bin/chromium``, driven by Playwright; Playwright's own browser
download is not used. A browser that cannot start fails the test.

The screenshots go to ``artifacts/ui-screenshots`` in the project (ignored by
git); the test prints where.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

import httpx
import pytest
from deploy_fixtures import PROVIDER_LATENCY, Deployed, wait_for_flow_run_id
from job_helpers import report, submit_job
from provider_fixtures import wait_for_status

from imageopt.jobs import display_name
from imageopt.samples import sample_paths
from imageopt.services import wait_for_history

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = "/usr/bin/chromium"
# Chromium's sandbox refuses to run as root; the machine has no GPU; and with
# no network, nothing should try to reach one (QUIC, updates, sync).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The UI fetches what it shows after the page has loaded.
UI_TIMEOUT_MS = 30_000


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """A headless Chromium with a new, empty profile in ``profile``.

    Started only once the Prefect work of a test is done: Playwright keeps an
    event loop in this thread while it runs, and Prefect's sync calls would
    take it for one they are inside.
    """
    from playwright.sync_api import Error, expect, sync_playwright

    profile.mkdir(parents=True)
    with sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1400, "height": 2000},
            )
        except Error as exc:
            first = str(exc).strip().splitlines()[0]
            pytest.fail(
                f"Chromium at {CHROMIUM} could not be started ({first}): install "
                "it with `apt-get install --no-install-recommends chromium`"
            )
        context.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def open_browser(tmp_path: Path) -> Iterator[Callable[[], BrowserContext]]:
    """Start Chromium when called; it is closed after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(chromium(tmp_path / "chromium-profile"))


@pytest.fixture
def screenshots() -> Path:
    """``artifacts/ui-screenshots`` in the project, emptied first; git ignores it.

    Not under pytest's temporary folder: pytest deletes older runs' folders,
    and a person should be able to look at the pictures afterwards.
    """
    folder = ARTIFACTS / "ui-screenshots"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    return folder


def _run_through_deployment(deployed: Deployed, job_id: int) -> UUID:
    """Start a flow run of the optimize-job deployment for the job; its id."""
    deployment_id = deployed.deployment_id("optimize-job/optimize-job")
    response = httpx.post(
        f"{deployed.api_url}/deployments/{deployment_id}/create_flow_run",
        json={"parameters": {"job_id": job_id}},
        timeout=10,
    )
    response.raise_for_status()

    return UUID(response.json()["id"])


def _poll_that_retried_most(api_url: str, flow_run_id: UUID) -> dict:
    response = httpx.post(
        f"{api_url}/task_runs/filter",
        json={
            "flow_runs": {"id": {"any_": [str(flow_run_id)]}},
            "task_runs": {"name": {"like_": "poll-prediction"}},
        },
        timeout=10,
    )
    response.raise_for_status()

    return max(response.json(), key=lambda run: run["run_count"])


def _sources_with_one_slow(image_server) -> list[str]:
    """Two sample files and a sample served by URL after a few seconds' wait.

    Before those, one prediction is made and waited for, so that the run
    learns from the provider that predictions take about PROVIDER_LATENCY.
    """
    fast, other, slow = sample_paths()[:3]
    slow_url = image_server.put(
        "slow/" + slow.name,
        slow.read_bytes(),
        "image/png",
        delay=4 * PROVIDER_LATENCY,
    )
    return [str(fast), str(other), slow_url]


def test_the_prefect_ui_shows_each_item_task_runs_and_a_poll_retrying(
    deployed: Deployed, image_server, open_browser, screenshots: Path, capsys
):
    from playwright.sync_api import expect

    client = deployed.provider.client()
    made = client.create({"image": image_server.sample_url("rocket.jpg")})
    wait_for_status(client, made.id)
    job_id = submit_job(deployed.database, _sources_with_one_slow(image_server))
    flow_run_id = _run_through_deployment(deployed, job_id)
    run = wait_for_flow_run_id(deployed.api_url, str(flow_run_id))
    # Task-run states reach the UI through events the server records later.
    wait_for_history(flow_run_id)
    items = report(deployed.database, job_id)["items"]
    poll = _poll_that_retried_most(deployed.api_url, flow_run_id)
    assert run["state"]["type"] == "COMPLETED", deployed.worker_output()
    assert [item["status"] for item in items] == ["COMPLETED"] * 3
    assert poll["run_count"] >= 2, (
        "no poll retried: the slowly served image's prediction should outlast "
        "the first poll of its item"
    )
    ui = deployed.api_url.removesuffix("/api")
    browser = open_browser()
    page = browser.new_page()

    page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
    expect(page.get_by_text(f"job-{job_id}").first).to_be_visible()
    page.locator("[role=tablist]").get_by_text("Task Runs", exact=True).click()
    for item in items:
        for stage in ("create-prediction", "poll-prediction"):
            name = f"{stage} {item['id']} {display_name(item['source'])}"
            expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    page.screenshot(path=screenshots / "1-flow-run-task-runs.png", full_page=True)

    page.get_by_role("link", name=poll["name"], exact=True).click()
    page.wait_for_url(f"**/runs/task-run/{poll['id']}**")
    run_count = (
        page.locator(".p-key-value")
        .filter(has=page.get_by_text("Run Count", exact=True))
        .locator(".p-key-value__value")
        .first
    )
    expect(run_count).to_have_text(str(poll["run_count"]))
    page.screenshot(path=screenshots / "2-poll-task-run.png", full_page=True)

    # The task run's state history, as the UI's event feed shows it.
    page.goto(f"{ui}/events?resource=prefect.task-run.{poll['id']}")
    retries = page.get_by_text("prefect.task-run.Retrying", exact=True)
    awaiting = page.get_by_text("prefect.task-run.AwaitingRetry", exact=True)
    expect(page.get_by_text("prefect.task-run.Completed", exact=True)).to_be_visible()
    expect(retries).to_have_count(poll["run_count"] - 1)
    expect(awaiting).to_have_count(poll["run_count"] - 1)
    page.screenshot(path=screenshots / "3-poll-state-history.png", full_page=True)
    with capsys.disabled():
        print(f"\nscreenshots of the Prefect UI: {screenshots}")
