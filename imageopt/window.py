"""A sliding window of items in flight, fed by task futures' completions.

Prefect's thread-pool task runner starts a thread for each running task and
queues the rest, so submitting a whole job at once would hold a future, a
closure and soon a thread per item. The flow instead keeps at most ``size``
items in flight and submits the next one when one ends; completions arrive on
a queue from the futures' callbacks, so waiting for one costs nothing per item
in flight.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prefect.task_runners import ThreadPoolTaskRunner

T = TypeVar("T")


@dataclass(frozen=True)
class Done(Generic[T]):
    """A future that finished, with what the flow attached to it."""

    stage: str
    subject: T
    future: Any


class Window(Generic[T]):
    """At most ``size`` subjects in flight, each through one stage at a time."""

    def __init__(self, size: int) -> None:
        if size < 1:
            msg = f"a window holds at least one item, not {size}"
            raise ValueError(msg)
        self.size = size
        self.in_flight = 0
        self._done: queue.Queue[Done[T]] = queue.Queue()

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.size

    def enter(self, stage: str, subject: T, future: Any) -> None:
        """A new subject takes a place in the window."""
        self.in_flight += 1
        self.track(stage, subject, future)

    def track(self, stage: str, subject: T, future: Any) -> None:
        """A subject already in the window moves on to its next stage."""
        future.add_done_callback(lambda f: self._done.put(Done(stage, subject, f)))

    def leave(self) -> None:
        """A subject has ended and gives its place up."""
        self.in_flight -= 1

    def next_done(self, timeout: float | None = None) -> Done[T] | None:
        """The next finished future, or None if none finished within ``timeout``."""
        try:
            return self._done.get(timeout=timeout)
        except queue.Empty:
            return None


class PrunedThreadPoolTaskRunner(ThreadPoolTaskRunner):
    """Prefect's thread-pool task runner, keeping nothing of finished tasks.

    Prefect 3.9's runner keeps a cancel event for every task submitted until
    the runner shuts down, a few hundred bytes each: 20,000 of them in a
    10,000-item job. This drops a task's event when the task ends, so memory
    stays flat however long the job; it is only needed until Prefect prunes
    the events itself.
    """

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        future = super().submit(task, parameters, wait_for, dependencies)
        events = self._cancel_events
        future.add_done_callback(lambda f: events.pop(f.task_run_id, None))
        return future


def forget_results(*results: Any, parts: bool = True) -> None:
    """Drop Prefect's links from these task results to their tasks' states.

    For the whole of a flow run, Prefect keeps a copy of each task's final
    state keyed by the ``id()`` of the task's result and of each of its parts
    (the items of a tuple, the fields of a dataclass), so that a result passed
    on to another task links the two (the poll's link to its create, in the
    UI, comes from it). That is a few kilobytes an item, never freed: call
    this once a result has served. It visits the parts as Prefect does,
    unless ``parts`` is false: parts passed on to a task must stay linked
    until that task has started.
    """
    from prefect.context import FlowRunContext
    from prefect.utilities.collections import visit_collection

    context = FlowRunContext.get()
    if context is None:
        return

    def forget(part: Any) -> None:
        context.run_results.pop(id(part), None)

    for result in results:
        visit_collection(result, visit_fn=forget, max_depth=1 if parts else 0)


def forget_assets(task_run_id: Any) -> None:
    """Drop the flow run's empty record of this finished task run's assets.

    Prefect records, for the whole of a flow run, the assets each task run
    hands on to the tasks that take its result: an empty set for every task
    run of a flow that declares no assets, about 0.4 KB each, never freed. A
    missing record reads as an empty one, so only empty ones are dropped.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is not None and not context.task_run_assets.get(task_run_id, True):
        del context.task_run_assets[task_run_id]
