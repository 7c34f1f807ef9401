"""Admission: when an item may create its prediction, and when a poll may go out.

The provider allows 600 prediction creations a minute and 3000 other requests
(polls count), and answers 429 beyond that; a prediction in flight also costs
money and provider capacity. Admission holds every process that shares the
database to that, and shares it fairly among stores:

- a *token bucket* for each kind of request, ``create`` and ``read``, with a
  burst of ``admission_burst_seconds`` of its rate;
- a *slot* per prediction in flight, at most ``max_in_flight`` in all, taken
  with a create grant and given back by :meth:`Admission.release`;
- weighted fair queuing among stores with waiters: each store has a virtual
  time per kind that advances by ``1/weight`` with each grant, and the lowest
  goes next. A store that starts waiting takes the larger of its own virtual
  time and the lowest among stores already waiting, so it is served at the
  next grant, neither after the others' backlog nor ahead of them on credit
  saved while it was idle. A store alone gets every token.

How it runs. Each :class:`Admission` (one a process, normally) has an *agent*
thread; threads asking for a grant wait on an event in the agent's queue. The
agent runs *passes*: one transaction that locks the row of ``admission_clock``,
reports how many of its threads wait for which store, gives back released
slots, refills the buckets, makes every grant the tokens and slots allow (to
waiters of any agent, by the fair choice), collects its own, and records which
agent will pass next. A pass is run by

- the *dispatcher*, the agent that promised to pass when the next token is
  due; it sleeps exactly until then (``admission_clock.dispatch_at``);
- an agent that was granted something by another's pass, woken by ``NOTIFY``
  on a channel of its own;
- an agent with something new to say: a store of its waiters the database does
  not know to be waiting, or a released slot.

So waiters never sleep a fixed interval: a token is handed out within a few
milliseconds of being due, and a released slot goes to the next waiter at once.
Passes are at least ``PASS_SPACING`` apart in an agent, so at the provider's
documented rates (10 creates and 50 reads a second) one pass hands out a few
grants, whatever the number of waiting threads.

Leases. An agent renews its row in ``admission_agents`` at each pass, and at
least every third of ``admission_lease_seconds``. Whoever passes after a lease
ran out deletes the row, and with it the dead agent's slots and waiters. A
dispatcher that dies is replaced by the next agent whose waiters find its
promise stale.

Throttling. A 429 empties the bucket of its kind, pauses it for the provider's
``retry_after``, halves its rate, and from then on the rate climbs back
linearly, from nothing to full in ``admission_recovery_seconds``. Further 429s
during the pause only lengthen it: the requests already in flight when the
first one came back say nothing new. The bucket lives in the database, so every
process backs off.

A database without the admission tables (before migration 0004) gets the same
interface run inside the process alone (:class:`_LocalState`), with one
WARNING saying so. The fair choice and the buckets are the same code in both
cases (:class:`Scheduler`); only where the state lives differs.

Known limits:

- A pass holds the lock for about 5 ms (two round trips and the commit), and
  each agent with waiters passes at most 20 times a second. Beyond roughly ten
  such processes on one database, passes queue for the lock: grants come a
  little later and several at a time, the rate itself stays whole. Moving the
  pass into one SQL function would cut the lock time to a single round trip.
- The rates and ``max_in_flight`` are each process's settings; the pass uses
  those of the process that runs it. Processes sharing a database should share
  these settings.
- An agent that cannot reach the database for longer than its lease loses its
  slots to the others; when it is back it takes them again and says so, but
  in between predictions in flight may exceed ``max_in_flight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from imageopt.db import Database
from imageopt.errors import AdmissionClosedError, AdmissionTimeoutError
from imageopt.migrate import current_version
from imageopt.settings import Settings

logger = logging.getLogger(__name__)

KINDS = ("create", "read")

# The migration that brings the shared state.
SHARED_VERSION = 4

# The least time between two passes of one agent. Tokens keep accruing in the
# bucket meanwhile (its burst is far larger), so the rate stays whole; what
# the spacing saves is transactions: at the provider's documented 60 requests
# a second it makes a pass hand out about three grants instead of one.
PASS_SPACING = 0.05

# How late a dispatcher may be with its pass before another agent whose items
# wait takes the job over; the same margin lets an agent that is not the
# dispatcher look for itself when no NOTIFY came.
TAKEOVER_GRACE = 1.0

# Grants are counted per second for `imageopt admission`; counts older than
# this are deleted, at most once per PRUNE_EVERY seconds.
TALLY_KEEP = 120.0
PRUNE_EVERY = 10.0


@dataclass(frozen=True)
class Limits:
    """What admission holds every process to, from the settings."""

    creates_per_minute: float
    reads_per_minute: float
    max_in_flight: int
    burst_seconds: float = 3.0
    lease_seconds: float = 15.0
    recovery_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            creates_per_minute=settings.creates_per_minute,
            reads_per_minute=settings.reads_per_minute,
            max_in_flight=settings.max_in_flight,
            burst_seconds=settings.admission_burst_seconds,
            lease_seconds=settings.admission_lease_seconds,
            recovery_seconds=settings.admission_recovery_seconds,
        )

    def per_minute(self, kind: str) -> float:
        return self.creates_per_minute if kind == "create" else self.reads_per_minute


@dataclass(frozen=True)
class Grant:
    """Leave for one item to create its prediction: a create token and a slot.

    The slot is the item's until :meth:`Admission.release` gives it back.
    ``waited`` is how long the item waited for it, in seconds.
    """

    store_id: int
    item_id: int
    waited: float


# -- the fair choice and the buckets ------------------------------------------


@dataclass
class TokenBucket:
    """One kind's tokens, and how far a 429 has lowered its rate.

    Times are seconds on the clock of whoever keeps the state: the database's
    in shared mode, so that machines whose clocks disagree still agree on it.
    """

    tokens: float
    updated_at: float
    factor: float = 1.0
    resume_at: float = 0.0
    # The fair queue's clock for this kind, kept with its bucket: where the
    # latest grant stood in the queue.
    virtual_time: float = 0.0

    def factor_at(self, now: float, limits: Limits) -> float:
        """The share of the configured rate allowed at ``now``."""
        if now <= self.resume_at:
            return self.factor
        climbed = (now - self.resume_at) / limits.recovery_seconds

        return min(1.0, self.factor + climbed)

    def rate(self, now: float, per_minute: float, limits: Limits) -> float:
        """Tokens a second at ``now``."""
        return per_minute / 60.0 * self.factor_at(now, limits)

    def refill(self, now: float, per_minute: float, limits: Limits) -> None:
        # Before updated_at the bucket is paused (the provider asked to wait).
        if now <= self.updated_at:
            return

        rate = self.rate(now, per_minute, limits)
        capacity = max(1.0, rate * limits.burst_seconds)
        self.tokens = min(capacity, self.tokens + (now - self.updated_at) * rate)
        if self.factor < 1.0 and now > self.resume_at:
            self.factor = self.factor_at(now, limits)
            self.resume_at = now
        self.updated_at = now

    def due_in(self, now: float, per_minute: float, limits: Limits) -> float:
        """Seconds until the bucket holds a whole token."""
        start = max(now, self.updated_at)
        missing = max(0.0, 1.0 - self.tokens)

        return start - now + missing / self.rate(start, per_minute, limits)

    def throttle(
        self, now: float, retry_after: float, per_minute: float, limits: Limits
    ) -> bool:
        """The provider said 429: pause, and halve the rate; True if halved."""
        self.refill(now, per_minute, limits)
        halved = now >= self.resume_at
        if halved:
            # Never below one request a minute, so the rate can be found again.
            floor = min(1.0, 1.0 / per_minute)
            self.factor = max(floor, self.factor_at(now, limits) / 2.0)
        self.resume_at = max(self.resume_at, now + retry_after)
        self.tokens = min(self.tokens, 0.0)
        self.updated_at = max(self.updated_at, now + retry_after)

        return halved


@dataclass
class Turn:
    """A store's place in the fair queue of one kind."""

    kind: str
    store_id: int
    weight: int = 1
    vtime: float = 0.0
    waiting: bool = False


@dataclass
class Waiting:
    """How many of one agent's waiters want one kind of grant for one store."""

    agent: str
    kind: str
    store_id: int
    waiting: int
    granted: int = 0

    @property
    def unserved(self) -> int:
        return max(0, self.waiting - self.granted)


@dataclass
class Scheduler:
    """One pass of the fair choice, on state it is handed and changes in place.

    It knows nothing of where the state lives: a pass in the database loads
    it, runs :meth:`grant` and writes back what changed; the in-process
    admission keeps one state between passes.
    """

    limits: Limits
    buckets: dict[str, TokenBucket]
    turns: dict[tuple[str, int], Turn]
    waiting: list[Waiting]
    # Slots taken, not counting create grants made but not yet collected.
    slots: int
    granted: Counter[tuple[str, int, str]] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        # A create grant holds its slot from the moment it is made, though the
        # slot's row is written only when its agent collects the grant.
        self.in_flight = self.slots + sum(
            w.granted for w in self.waiting if w.kind == "create"
        )

    @property
    def slots_full(self) -> bool:
        return self.in_flight >= self.limits.max_in_flight

    def grant(self, now: float) -> None:
        """Hand out every token the buckets and slots allow, fairly."""
        for kind in KINDS:
            self._grant_kind(kind, now)

    def _grant_kind(self, kind: str, now: float) -> None:
        bucket = self.buckets[kind]
        bucket.refill(now, self.limits.per_minute(kind), self.limits)
        unserved = self._unserved(kind)
        self._queue_stores(kind, unserved)

        while bucket.tokens >= 1.0:
            if kind == "create" and self.slots_full:
                break
            waiting_turns = [
                t for t in self.turns.values() if t.kind == kind and t.waiting
            ]
            if not waiting_turns:
                break

            turn = min(waiting_turns, key=lambda t: (t.vtime, t.store_id))
            # Among agents waiting for the same store, the one with the most
            # unserved waiters, which spreads a store's grants over them.
            row = max(
                (
                    w
                    for w in self.waiting
                    if w.kind == kind and w.store_id == turn.store_id
                ),
                key=lambda w: w.unserved,
            )
            row.granted += 1
            bucket.tokens -= 1.0
            bucket.virtual_time = max(bucket.virtual_time, turn.vtime)
            turn.vtime += 1.0 / turn.weight
            if kind == "create":
                self.in_flight += 1
            self.granted[kind, turn.store_id, row.agent] += 1
            unserved[turn.store_id] -= 1
            if unserved[turn.store_id] <= 0:
                turn.waiting = False

    def _unserved(self, kind: str) -> dict[int, int]:
        unserved: dict[int, int] = defaultdict(int)
        for row in self.waiting:
            if row.kind == kind:
                unserved[row.store_id] += row.unserved

        return unserved

    def _queue_stores(self, kind: str, unserved: dict[int, int]) -> None:
        """Stores that start waiting join at the others' virtual time."""
        already = [
            t.vtime
            for t in self.turns.values()
            if t.kind == kind and t.waiting and unserved.get(t.store_id, 0) > 0
        ]
        floor = min(already) if already else self.buckets[kind].virtual_time
        for store_id, count in unserved.items():
            turn = self.turns.setdefault((kind, store_id), Turn(kind, store_id))
            if count > 0 and not turn.waiting:
                turn.vtime = max(turn.vtime, floor)
                turn.waiting = True
        for turn in self.turns.values():
            if turn.kind == kind and unserved.get(turn.store_id, 0) <= 0:
                turn.waiting = False

    def due_in(self, now: float) -> float | None:
        """Seconds until a token is due for some waiter; None if none can use one.

        Creates blocked by full slots are left out: a release, or a dead
        agent's lease running out, is what frees them.
        """
        waits = []
        for kind in KINDS:
            has_waiters = any(t.waiting for t in self.turns.values() if t.kind == kind)
            if not has_waiters or (kind == "create" and self.slots_full):
                continue
            bucket = self.buckets[kind]
            waits.append(bucket.due_in(now, self.limits.per_minute(kind), self.limits))

        return min(waits, default=None)

    def creates_blocked(self) -> bool:
        """Whether items wait for a slot rather than for a token."""
        return self.slots_full and any(
            t.waiting for t in self.turns.values() if t.kind == "create"
        )


# -- the waiting threads of one agent -----------------------------------------


_WAITING, _TAKEN, _DONE = "waiting", "taken", "done"


class _Waiter:
    """A thread waiting for a grant; the agent wakes it through its event."""

    __slots__ = ("error", "event", "item_id", "kind", "since", "state", "store_id")

    def __init__(self, kind: str, store_id: int, item_id: int | None) -> None:
        self.kind = kind
        self.store_id = store_id
        self.item_id = item_id
        self.since = time.monotonic()
        self.event = threading.Event()
        self.state = _WAITING
        self.error: Exception | None = None


class _Waiters:
    """An agent's waiting threads, first come first served within a store.

    A pass takes waiters out while its transaction is open and either
    confirms them (wakes them) or, if the transaction failed, puts them back
    at the front in their order. :meth:`add`, :meth:`counts` and
    :meth:`withdraw` are called with ``lock`` held, which also guards the
    :class:`Admission`'s own bookkeeping; the others take it themselves.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._queues: dict[tuple[str, int], deque[_Waiter]] = defaultdict(deque)

    def add(self, waiter: _Waiter) -> None:
        self._queues[waiter.kind, waiter.store_id].append(waiter)

    def counts(self) -> dict[tuple[str, int], int]:
        return {key: len(q) for key, q in self._queues.items() if q}

    def withdraw(self, waiter: _Waiter) -> bool:
        """Take a waiter out that gave up; False if a pass already took it."""
        if waiter.state != _WAITING:
            return False
        self._queues[waiter.kind, waiter.store_id].remove(waiter)
        waiter.state = _DONE

        return True

    def take(self, claimed: dict[tuple[str, int], int]) -> list[_Waiter]:
        taken = []
        with self.lock:
            for key, count in claimed.items():
                queue = self._queues.get(key)
                while queue and count > 0:
                    waiter = queue.popleft()
                    waiter.state = _TAKEN
                    taken.append(waiter)
                    count -= 1

        return taken

    def give_back(self, taken: list[_Waiter]) -> None:
        with self.lock:
            for waiter in reversed(taken):
                waiter.state = _WAITING
                self._queues[waiter.kind, waiter.store_id].appendleft(waiter)

    def drain(self) -> list[_Waiter]:
        with self.lock:
            waiters = [w for q in self._queues.values() for w in q]
            self._queues.clear()

        return waiters


@dataclass
class _PassResult:
    """What a pass did for the agent that ran it."""

    taken: list[_Waiter]
    # Waiters the database now knows of for this agent, by kind and store.
    registered: dict[tuple[str, int], int]
    # Seconds until this agent should pass again; None: only when woken.
    wake_in: float | None


# -- where the state lives -----------------------------------------------------


def has_shared_state(conn: psycopg.Connection) -> bool:
    """Whether the database has admission's tables (migration 0004 ran)."""
    (present,) = conn.execute(
        "SELECT to_regclass('admission_clock') IS NOT NULL"
    ).fetchone()

    return bool(present)


@dataclass
class _Loaded:
    """What a pass read from the database, under the lock."""

    now: float
    dispatcher: str | None
    dispatch_at: float | None
    lease_lapsed: bool
    scheduler: Scheduler
    # When the first lease of another agent holding slots runs out.
    next_expiry: float | None


class _SharedState:
    """Admission's state in the database, shared by every agent using it."""

    shared = True

    def __init__(self, db: Database, limits: Limits, agent: str) -> None:
        self._db = db
        self._limits = limits
        self._agent = agent
        self._conn: psycopg.Connection | None = None
        self._passes = 0
        self._pruned_at = 0.0

    def _connection(self) -> psycopg.Connection:
        # A connection of its own, not one from the pool: the flow's threads
        # may hold every pooled connection, and admission must still grant.
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._db.conninfo, autocommit=True)

        return self._conn

    def run_pass(
        self, waiters: _Waiters, released: list[int], held: dict[int, int]
    ) -> _PassResult:
        conn = self._connection()
        taken: list[_Waiter] = []
        try:
            with conn.transaction():
                result = self._pass(conn, waiters, released, held, taken)
        except BaseException:
            waiters.give_back(taken)
            raise
        self._passes += 1

        return result

    def _pass(
        self,
        conn: psycopg.Connection,
        waiters: _Waiters,
        released: list[int],
        held: dict[int, int],
        taken: list[_Waiter],
    ) -> _PassResult:
        with waiters.lock:
            counts = waiters.counts()
        loaded = self._load(conn, counts, released)
        scheduler = loaded.scheduler
        before = {key: (t.vtime, t.waiting) for key, t in scheduler.turns.items()}
        scheduler.grant(loaded.now)

        # This agent collects its grants, those of this pass and any earlier
        # ones another agent's pass made.
        claimed: dict[tuple[str, int], int] = {}
        registered: dict[tuple[str, int], int] = {}
        for row in scheduler.waiting:
            if row.agent == self._agent:
                claimed[row.kind, row.store_id] = row.granted
                row.waiting = max(0, row.waiting - row.granted)
                row.granted = 0
                registered[row.kind, row.store_id] = row.waiting
        taken += waiters.take({key: n for key, n in claimed.items() if n})
        slots = [(w.item_id, w.store_id) for w in taken if w.kind == "create"]
        if loaded.lease_lapsed and held:
            logger.warning(
                "admission's lease ran out before it was renewed, and the %s "
                "slot(s) it held were given back; taking them again, so "
                "predictions in flight may briefly exceed %s",
                len(held),
                self._limits.max_in_flight,
            )
            slots += list(held.items())

        has_waiters = any(registered.values())
        wake_in, promise = self._next_pass(loaded, has_waiters)
        self._save(conn, scheduler, before, slots, promise, loaded.now)

        return _PassResult(taken, registered, wake_in)

    def _load(
        self,
        conn: psycopg.Connection,
        counts: dict[tuple[str, int], int],
        released: list[int],
    ) -> _Loaded:
        kinds = [kind for kind, _ in counts]
        stores = [store_id for _, store_id in counts]
        agent = self._agent
        # One round trip: the statements run in order, the first waiting for
        # the lock, and their results are read afterwards.
        with conn.pipeline():
            clock = conn.execute(
                "SELECT dispatcher::text, extract(epoch FROM dispatch_at)"
                " FROM admission_clock FOR UPDATE"
            )
            now = conn.execute("SELECT extract(epoch FROM clock_timestamp())")
            renewed = conn.execute(
                """
                INSERT INTO admission_agents (id, host, pid, lease_until)
                VALUES (%s, %s, %s, clock_timestamp() + make_interval(secs => %s))
                ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until
                RETURNING xmax = 0
                """,
                (agent, socket.gethostname(), os.getpid(), self._limits.lease_seconds),
            )
            # The dead agents' slots are counted before the delete cascades.
            reclaimed = conn.execute(
                """
                WITH dead AS (
                    DELETE FROM admission_agents
                    WHERE lease_until < clock_timestamp() RETURNING id
                )
                SELECT count(*), (
                    SELECT count(*) FROM admission_slots
                    WHERE agent IN (SELECT id FROM dead)
                )
                FROM dead
                """
            )
            if released:
                conn.execute(
                    "DELETE FROM admission_slots WHERE item_id = ANY(%s::bigint[])",
                    (released,),
                )
            conn.execute(
                """
                DELETE FROM admission_waiters
                WHERE agent = %s::uuid AND (kind, store_id) NOT IN (
                    SELECT * FROM unnest(%s::text[], %s::bigint[])
                )
                """,
                (agent, kinds, stores),
            )
            if counts:
                conn.execute(
                    """
                    INSERT INTO admission_waiters (agent, kind, store_id, waiting)
                    SELECT %s::uuid, *
                    FROM unnest(%s::text[], %s::bigint[], %s::int[])
                    ON CONFLICT (agent, kind, store_id)
                    DO UPDATE SET waiting = EXCLUDED.waiting
                    """,
                    (agent, kinds, stores, list(counts.values())),
                )
            buckets = conn.execute(
                "SELECT kind, tokens, extract(epoch FROM updated_at), factor,"
                " extract(epoch FROM resume_at), virtual_time FROM admission_buckets"
            )
            waiting = conn.execute(
                "SELECT agent::text, kind, store_id, waiting, granted"
                " FROM admission_waiters"
            )
            turns = conn.execute(
                """
                SELECT k.kind, k.store_id, coalesce(s.weight, 1),
                       coalesce(t.vtime, 0), coalesce(t.waiting, false)
                FROM (
                    SELECT kind, store_id FROM admission_waiters
                    UNION SELECT kind, store_id FROM admission_turns WHERE waiting
                ) k
                LEFT JOIN admission_turns t USING (kind, store_id)
                LEFT JOIN stores s ON s.id = k.store_id
                """
            )
            slots = conn.execute(
                """
                SELECT count(*), extract(epoch FROM min(a.lease_until)
                                         FILTER (WHERE a.id <> %s::uuid))
                FROM admission_slots s JOIN admission_agents a ON a.id = s.agent
                """,
                (agent,),
            )

        dispatcher, dispatch_at = clock.fetchone()
        (inserted,) = renewed.fetchone()
        dead_agents, dead_slots = reclaimed.fetchone()
        if dead_agents:
            logger.warning(
                "the lease of %s admission agent(s) ran out (their process "
                "stopped or lost the database): %s slot(s) they held are free",
                dead_agents,
                dead_slots,
            )
        in_flight, next_expiry = slots.fetchone()
        scheduler = Scheduler(
            self._limits,
            buckets={
                kind: TokenBucket(
                    tokens=tokens,
                    updated_at=float(updated_at),
                    factor=factor,
                    resume_at=float(resume_at),
                    virtual_time=virtual_time,
                )
                for kind, tokens, updated_at, factor, resume_at, virtual_time in (
                    buckets.fetchall()
                )
            },
            turns={
                (kind, store_id): Turn(kind, store_id, weight, vtime, was_waiting)
                for kind, store_id, weight, vtime, was_waiting in turns.fetchall()
            },
            waiting=[Waiting(*row) for row in waiting.fetchall()],
            slots=in_flight,
        )

        return _Loaded(
            now=float(now.fetchone()[0]),
            dispatcher=dispatcher,
            dispatch_at=None if dispatch_at is None else float(dispatch_at),
            lease_lapsed=inserted and self._passes > 0,
            scheduler=scheduler,
            next_expiry=None if next_expiry is None else float(next_expiry),
        )

    def _next_pass(
        self, loaded: _Loaded, has_waiters: bool
    ) -> tuple[float | None, tuple[str | None, float | None] | None]:
        """When this agent passes next, and the dispatcher's promise to store.

        The promise is None when it stays as it is.
        """
        now, scheduler = loaded.now, loaded.scheduler
        waits = [scheduler.due_in(now)]
        if scheduler.creates_blocked() and loaded.next_expiry is not None:
            # Another agent's lease may run out and free its slots.
            waits.append(max(0.0, loaded.next_expiry - now) + 0.01)
        due_in = min((w for w in waits if w is not None), default=None)

        mine = loaded.dispatcher == self._agent
        if due_in is None:
            return None, ((None, None) if mine else None)

        due = now + due_in
        promised = loaded.dispatch_at
        stale = promised is None or promised < now - TAKEOVER_GRACE
        if mine or stale or promised > due + PASS_SPACING:
            return due_in, (self._agent, due)
        if has_waiters:
            return promised - now + TAKEOVER_GRACE, None

        return None, None

    def _save(
        self,
        conn: psycopg.Connection,
        scheduler: Scheduler,
        before: dict[tuple[str, int], tuple[float, bool]],
        slots: list[tuple[int, int]],
        promise: tuple[str | None, float | None] | None,
        now: float,
    ) -> None:
        turns = [
            t
            for key, t in scheduler.turns.items()
            if before.get(key) != (t.vtime, t.waiting)
        ]
        rows = scheduler.waiting
        tally: Counter[tuple[str, int]] = Counter()
        for (kind, store_id, _), n in scheduler.granted.items():
            tally[kind, store_id] += n
        others = {a for (_, _, a) in scheduler.granted if a != self._agent}

        with conn.pipeline():
            conn.cursor().executemany(
                """
                UPDATE admission_buckets
                SET per_minute = %s, tokens = %s, updated_at = to_timestamp(%s),
                    factor = %s, resume_at = to_timestamp(%s), virtual_time = %s
                WHERE kind = %s
                """,
                [
                    (
                        self._limits.per_minute(kind),
                        b.tokens,
                        b.updated_at,
                        b.factor,
                        b.resume_at,
                        b.virtual_time,
                        kind,
                    )
                    for kind, b in scheduler.buckets.items()
                ],
            )
            if turns:
                conn.execute(
                    """
                    INSERT INTO admission_turns (kind, store_id, vtime, waiting)
                    SELECT * FROM unnest(
                        %s::text[], %s::bigint[], %s::float8[], %s::boolean[]
                    )
                    ON CONFLICT (kind, store_id) DO UPDATE
                    SET vtime = EXCLUDED.vtime, waiting = EXCLUDED.waiting
                    """,
                    (
                        [t.kind for t in turns],
                        [t.store_id for t in turns],
                        [t.vtime for t in turns],
                        [t.waiting for t in turns],
                    ),
                )
            if rows:
                conn.execute(
                    """
                    UPDATE admission_waiters w
                    SET waiting = u.waiting, granted = u.granted
                    FROM unnest(
                        %s::uuid[], %s::text[], %s::bigint[], %s::int[], %s::int[]
                    ) AS u(agent, kind, store_id, waiting, granted)
                    WHERE (w.agent, w.kind, w.store_id)
                        = (u.agent, u.kind, u.store_id)
                    """,
                    (
                        [r.agent for r in rows],
                        [r.kind for r in rows],
                        [r.store_id for r in rows],
                        [r.waiting for r in rows],
                        [r.granted for r in rows],
                    ),
                )
                conn.execute(
                    "DELETE FROM admission_waiters"
                    " WHERE agent = %s::uuid AND waiting = 0 AND granted = 0",
                    (self._agent,),
                )
            if slots:
                conn.execute(
                    """
                    INSERT INTO admission_slots (item_id, store_id, agent)
                    SELECT *, %s::uuid FROM unnest(%s::bigint[], %s::bigint[])
                    ON CONFLICT (item_id) DO UPDATE
                    SET store_id = EXCLUDED.store_id, agent = EXCLUDED.agent,
                        taken_at = now()
                    """,
                    (self._agent, [i for i, _ in slots], [s for _, s in slots]),
                )
            if tally:
                conn.execute(
                    """
                    INSERT INTO admission_grants (kind, store_id, second, grants)
                    SELECT k, s, date_trunc('second', to_timestamp(%s)), n
                    FROM unnest(%s::text[], %s::bigint[], %s::int[]) AS u(k, s, n)
                    ON CONFLICT (kind, store_id, second)
                    DO UPDATE SET grants = admission_grants.grants + EXCLUDED.grants
                    """,
                    (
                        now,
                        [kind for kind, _ in tally],
                        [store_id for _, store_id in tally],
                        list(tally.values()),
                    ),
                )
            if now - self._pruned_at > PRUNE_EVERY:
                conn.execute(
                    "DELETE FROM admission_grants WHERE second < to_timestamp(%s)",
                    (now - TALLY_KEEP,),
                )
                self._pruned_at = now
            if promise is None:
                conn.execute(
                    "UPDATE admission_clock SET max_in_flight = %s",
                    (self._limits.max_in_flight,),
                )
            else:
                conn.execute(
                    "UPDATE admission_clock SET dispatcher = %s::uuid,"
                    " dispatch_at = to_timestamp(%s), max_in_flight = %s",
                    (*promise, self._limits.max_in_flight),
                )
            # Delivered when the transaction commits, not before.
            for other in sorted(others):
                conn.execute("SELECT pg_notify(%s, '')", (_channel(other),))

    def throttle(self, kind: str, retry_after: float) -> tuple[bool, float]:
        """Lower the rate of ``kind`` for everyone; (halved, rate a minute now)."""
        per_minute = self._limits.per_minute(kind)
        with self._db.connection() as conn, conn.transaction():
            conn.execute("SELECT 1 FROM admission_clock FOR UPDATE")
            row = conn.execute(
                "SELECT extract(epoch FROM clock_timestamp()), tokens,"
                " extract(epoch FROM updated_at), factor,"
                " extract(epoch FROM resume_at), virtual_time"
                " FROM admission_buckets WHERE kind = %s",
                (kind,),
            ).fetchone()
            now = float(row[0])
            bucket = TokenBucket(
                tokens=row[1],
                updated_at=float(row[2]),
                factor=row[3],
                resume_at=float(row[4]),
                virtual_time=row[5],
            )
            halved = bucket.throttle(now, retry_after, per_minute, self._limits)
            conn.execute(
                "UPDATE admission_buckets SET tokens = %s,"
                " updated_at = to_timestamp(%s), factor = %s,"
                " resume_at = to_timestamp(%s) WHERE kind = %s",
                (
                    bucket.tokens,
                    bucket.updated_at,
                    bucket.factor,
                    bucket.resume_at,
                    kind,
                ),
            )

        return halved, per_minute * bucket.factor

    def release_now(self, item_ids: list[int]) -> None:
        """Give slots back without the agent (it has stopped)."""
        with self._db.connection() as conn:
            conn.execute(
                "DELETE FROM admission_slots WHERE item_id = ANY(%s::bigint[])",
                (item_ids,),
            )

    def snapshot(self, waiters: _Waiters) -> dict[str, Any]:
        with self._db.connection() as conn:
            return read_snapshot(conn, self._limits)

    def close(self, holding: bool) -> None:
        """Forget this agent's waiters; its slots too unless it still holds some.

        Slots still held belong to predictions that may still run at the
        provider, so they stay taken until the lease runs out.
        """
        try:
            conn = self._connection()
            with conn.transaction():
                self._hand_over(conn)
                if holding:
                    conn.execute(
                        "DELETE FROM admission_waiters WHERE agent = %s::uuid",
                        (self._agent,),
                    )
                else:
                    conn.execute(
                        "DELETE FROM admission_agents WHERE id = %s::uuid",
                        (self._agent,),
                    )
        except psycopg.Error as exc:
            logger.debug("admission could not tidy up as it closed: %s", exc)
        finally:
            self.disconnect()

    def _hand_over(self, conn: psycopg.Connection) -> None:
        """If this agent is the dispatcher, let an agent with waiters take over.

        Without this they would wait for the dispatcher's promise to go stale.
        """
        conn.execute("SELECT 1 FROM admission_clock FOR UPDATE")
        cleared = conn.execute(
            "UPDATE admission_clock SET dispatcher = NULL, dispatch_at = NULL"
            " WHERE dispatcher = %s::uuid RETURNING 1",
            (self._agent,),
        ).fetchone()
        if cleared is None:
            return

        others = conn.execute(
            "SELECT DISTINCT agent::text FROM admission_waiters"
            " WHERE agent <> %s::uuid",
            (self._agent,),
        ).fetchall()
        for (other,) in others:
            conn.execute("SELECT pg_notify(%s, '')", (_channel(other),))

    def disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _channel(agent: str) -> str:
    """The NOTIFY channel on which an agent hears that a grant is its."""
    return f"imageopt_admission_{agent.replace('-', '')}"


class _LocalState:
    """Admission's state inside this process: for a database without 0004.

    The same buckets and fair choice, without sharing: the rate and the slot
    bound hold for this process alone. Store weights are read from the
    database, again at most every ``WEIGHTS_EVERY`` seconds.
    """

    shared = False
    WEIGHTS_EVERY = 10.0

    def __init__(self, db: Database, limits: Limits) -> None:
        self._db = db
        self._limits = limits
        self._lock = threading.Lock()
        now = time.monotonic()
        self._buckets = {
            kind: TokenBucket(
                tokens=max(1.0, limits.per_minute(kind) / 60 * limits.burst_seconds),
                updated_at=now,
            )
            for kind in KINDS
        }
        self._turns: dict[tuple[str, int], Turn] = {}
        self._slots: dict[int, int] = {}
        self._tally: deque[tuple[float, str, int, int]] = deque()
        self._weights: dict[int, int] = {}
        self._weights_at = 0.0

    def run_pass(
        self, waiters: _Waiters, released: list[int], held: dict[int, int]
    ) -> _PassResult:
        with waiters.lock:
            counts = waiters.counts()
        weights = self._weights_of({store_id for _, store_id in counts})

        with self._lock:
            now = time.monotonic()
            for item_id in released:
                self._slots.pop(item_id, None)
            rows = [Waiting("", kind, s, n) for (kind, s), n in counts.items()]
            for turn in self._turns.values():
                turn.weight = weights.get(turn.store_id, 1)
            scheduler = Scheduler(
                self._limits, self._buckets, self._turns, rows, len(self._slots)
            )
            for kind, store_id in counts:
                scheduler.turns.setdefault(
                    (kind, store_id),
                    Turn(kind, store_id, weight=weights.get(store_id, 1)),
                )
            scheduler.grant(now)

            claimed = {(r.kind, r.store_id): r.granted for r in rows if r.granted}
            taken = waiters.take(claimed)
            for waiter in taken:
                if waiter.kind == "create":
                    self._slots[waiter.item_id] = waiter.store_id
            for (kind, store_id, _), n in scheduler.granted.items():
                self._tally.append((now, kind, store_id, n))
            while self._tally and self._tally[0][0] < now - 60.0:
                self._tally.popleft()
            registered = {(r.kind, r.store_id): r.unserved for r in rows}

            return _PassResult(taken, registered, scheduler.due_in(now))

    def _weights_of(self, store_ids: set[int]) -> dict[int, int]:
        stale = time.monotonic() - self._weights_at > self.WEIGHTS_EVERY
        if not stale and store_ids <= self._weights.keys():
            return self._weights

        try:
            with self._db.connection() as conn:
                rows = conn.execute("SELECT id, weight FROM stores").fetchall()
        except psycopg.Error as exc:
            logger.debug("admission could not read store weights: %s", exc)
            return self._weights
        self._weights = dict(rows)
        self._weights_at = time.monotonic()

        return self._weights

    def throttle(self, kind: str, retry_after: float) -> tuple[bool, float]:
        per_minute = self._limits.per_minute(kind)
        with self._lock:
            bucket = self._buckets[kind]
            halved = bucket.throttle(
                time.monotonic(), retry_after, per_minute, self._limits
            )

        return halved, per_minute * bucket.factor

    def release_now(self, item_ids: list[int]) -> None:
        with self._lock:
            for item_id in item_ids:
                self._slots.pop(item_id, None)

    def snapshot(self, waiters: _Waiters) -> dict[str, Any]:
        with waiters.lock:
            counts = waiters.counts()
        with self._lock:
            now = time.monotonic()
            granted: Counter[tuple[str, int]] = Counter()
            for at, kind, store_id, n in self._tally:
                if at >= now - 60.0:
                    granted[kind, store_id] += n
            rates = {
                kind: _rate_view(
                    bucket, now, self._limits.per_minute(kind), self._limits
                )
                for kind, bucket in self._buckets.items()
            }
            in_flight = Counter(self._slots.values())
        store_ids = {s for _, s in counts} | set(in_flight) | {s for _, s in granted}
        with self._db.connection() as conn:
            stores = _stores(conn, store_ids)

        return _snapshot(
            shared=False,
            limits=self._limits,
            rates=rates,
            waiting=counts,
            in_flight=in_flight,
            granted=granted,
            agents=1,
            stores=stores,
        )

    def close(self, holding: bool) -> None:
        pass

    def disconnect(self) -> None:
        pass


# -- what `imageopt admission` shows ------------------------------------------


def read_snapshot(conn: psycopg.Connection, limits: Limits) -> dict[str, Any]:
    """Admission as every process sharing the database sees it now."""
    (now,) = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
    now = float(now)
    rates = {}
    for kind, per_minute, tokens, updated_at, factor, resume_at in conn.execute(
        "SELECT kind, per_minute, tokens, extract(epoch FROM updated_at), factor,"
        " extract(epoch FROM resume_at) FROM admission_buckets ORDER BY kind"
    ):
        bucket = TokenBucket(
            tokens=tokens,
            updated_at=float(updated_at),
            factor=factor,
            resume_at=float(resume_at),
        )
        rates[kind] = _rate_view(bucket, now, per_minute, limits)

    waiting = {
        (kind, store_id): int(n)
        for kind, store_id, n in conn.execute(
            "SELECT w.kind, w.store_id, sum(greatest(w.waiting - w.granted, 0))"
            " FROM admission_waiters w JOIN admission_agents a ON a.id = w.agent"
            " WHERE a.lease_until >= clock_timestamp()"
            " GROUP BY w.kind, w.store_id"
        )
        if n
    }
    in_flight = Counter(
        dict(
            conn.execute(
                "SELECT store_id, count(*) FROM admission_slots GROUP BY store_id"
            ).fetchall()
        )
    )
    granted = Counter(
        {
            (kind, store_id): int(n)
            for kind, store_id, n in conn.execute(
                "SELECT kind, store_id, sum(grants) FROM admission_grants"
                " WHERE second >= to_timestamp(%s) GROUP BY kind, store_id",
                (now - 60.0,),
            )
        }
    )
    # The bound the admitting processes use, if any has passed yet.
    (max_in_flight,) = conn.execute(
        "SELECT max_in_flight FROM admission_clock"
    ).fetchone()
    if max_in_flight is not None:
        limits = dataclasses.replace(limits, max_in_flight=max_in_flight)
    (agents,) = conn.execute(
        "SELECT count(*) FROM admission_agents WHERE lease_until >= clock_timestamp()"
    ).fetchone()
    store_ids = {s for _, s in waiting} | set(in_flight) | {s for _, s in granted}

    return _snapshot(
        shared=True,
        limits=limits,
        rates=rates,
        waiting=waiting,
        in_flight=in_flight,
        granted=granted,
        agents=agents,
        stores=_stores(conn, store_ids),
    )


def _rate_view(
    bucket: TokenBucket, now: float, per_minute: float, limits: Limits
) -> dict[str, Any]:
    return {
        "per_minute": per_minute,
        "allowed_per_minute": round(per_minute * bucket.factor_at(now, limits), 1),
        "paused_for": round(max(0.0, bucket.updated_at - now), 1),
    }


def _stores(conn: psycopg.Connection, store_ids: Iterable[int]) -> dict[int, tuple]:
    rows = conn.execute(
        "SELECT id, name, weight FROM stores WHERE id = ANY(%s::bigint[])",
        (sorted(store_ids),),
    ).fetchall()

    return {store_id: (name, weight) for store_id, name, weight in rows}


def _snapshot(
    *,
    shared: bool,
    limits: Limits,
    rates: dict[str, dict[str, Any]],
    waiting: dict[tuple[str, int], int],
    in_flight: Counter[int],
    granted: Counter[tuple[str, int]],
    agents: int,
    stores: dict[int, tuple],
) -> dict[str, Any]:
    totals = Counter()
    for (kind, _), n in granted.items():
        totals[kind] += n
    for kind, view in rates.items():
        view["granted_last_minute"] = totals[kind]

    ids = sorted({s for _, s in waiting} | set(in_flight) | {s for _, s in granted})
    rows = []
    for store_id in ids:
        name, weight = stores.get(store_id, (None, 1))
        creates, reads = granted[("create", store_id)], granted[("read", store_id)]
        rows.append(
            {
                "store_id": store_id,
                "name": name,
                "weight": weight,
                "waiting_items": waiting.get(("create", store_id), 0),
                "waiting_reads": waiting.get(("read", store_id), 0),
                "in_flight": in_flight[store_id],
                "creates_last_minute": creates,
                "create_share": _share(creates, totals["create"]),
                "reads_last_minute": reads,
                "read_share": _share(reads, totals["read"]),
            }
        )

    return {
        "shared": shared,
        "agents": agents,
        "in_flight": sum(in_flight.values()),
        "max_in_flight": limits.max_in_flight,
        "rates": rates,
        "stores": rows,
    }


def _share(part: int, whole: int) -> float:
    return round(part / whole, 3) if whole else 0.0


# -- the interface -------------------------------------------------------------


class Admission:
    """Admission for the threads of one process; see the module's docstring.

    Open it with :meth:`open`, which starts its agent thread, and close it
    when the process (or the flow run) is done. Every method is safe to call
    from any thread.
    """

    def __init__(
        self,
        db: Database,
        limits: Limits,
        state: _SharedState | _LocalState,
        agent: str,
    ) -> None:
        self._db = db
        self._limits = limits
        self._state = state
        self._agent = agent
        self._waiters = _Waiters()
        self._lock = self._waiters.lock
        # Guarded by _lock: what the next pass reports, and what is held.
        self._released: list[int] = []
        self._held: dict[int, int] = {}
        self._registered: dict[tuple[str, int], int] = {}
        self._closing = False

        self._wake = threading.Event()
        self._passed_at = 0.0
        self.passes = 0
        self.grants = 0
        self._threads: list[threading.Thread] = []

    @classmethod
    def open(cls, db: Database, settings: Settings) -> Admission:
        """Admission for this process, shared through ``db`` if its schema allows."""
        limits = Limits.from_settings(settings)
        agent = str(uuid.uuid4())
        with db.connection() as conn:
            shared = has_shared_state(conn)
            version = current_version(conn)

        if shared:
            state: _SharedState | _LocalState = _SharedState(db, limits, agent)
        else:
            logger.warning(
                "the database schema is at version %s, without admission's "
                "tables: admission runs inside this process only, so the rates "
                "(%s creates and %s reads a minute), the %s slots in flight and "
                "the store shares hold for this process alone, not across "
                "processes; run `imageopt migrate` (version %s brings them) to "
                "share them from the next Admission opened on",
                version,
                limits.creates_per_minute,
                limits.reads_per_minute,
                limits.max_in_flight,
                SHARED_VERSION,
            )
            state = _LocalState(db, limits)

        admission = cls(db, limits, state, agent)
        admission._start()

        return admission

    @property
    def shared(self) -> bool:
        """Whether admission is shared through the database."""
        return self._state.shared

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def admit_create(
        self, store_id: int, item_id: int, *, timeout: float | None = None
    ) -> Grant:
        """Block until the item may create its prediction: a token and a slot.

        An item holds one slot at most: admitting an item again (after the
        provider throttled its create, say) gives its slot back first, so that
        items waiting again never sit on capacity. Raises
        :class:`~imageopt.errors.AdmissionTimeoutError` after ``timeout``
        seconds.
        """
        waited = self._admit("create", store_id, item_id, timeout)
        logger.debug(
            "item %s of store %s admitted to create after %.3f s",
            item_id,
            store_id,
            waited,
        )

        return Grant(store_id=store_id, item_id=item_id, waited=waited)

    def admit_read(self, store_id: int, *, timeout: float | None = None) -> float:
        """Block until a read (a poll) may be sent for the store; the wait, in s."""
        waited = self._admit("read", store_id, None, timeout)
        logger.debug("a read for store %s admitted after %.3f s", store_id, waited)

        return waited

    def _admit(
        self, kind: str, store_id: int, item_id: int | None, timeout: float | None
    ) -> float:
        waiter = _Waiter(kind, store_id, item_id)
        with self._lock:
            if self._closing:
                raise AdmissionClosedError(_closed_message(kind, store_id, item_id))
            urgent = self._registered.get((kind, store_id), 0) == 0
            if item_id is not None and item_id in self._held:
                del self._held[item_id]
                self._released.append(item_id)
                urgent = True
            self._waiters.add(waiter)
        # A store the database does not know to be waiting here needs a pass
        # now; otherwise the next pass, due anyway, reports the new waiter.
        if urgent:
            self._wake.set()

        if not waiter.event.wait(timeout):
            with self._lock:
                gave_up = self._waiters.withdraw(waiter)
            if gave_up:
                raise AdmissionTimeoutError(
                    self._timeout_message(kind, store_id, item_id, timeout)
                )
            # A pass took the waiter just now; its grant is moments away.
            waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error

        return time.monotonic() - waiter.since

    def _timeout_message(
        self, kind: str, store_id: int, item_id: int | None, timeout: float | None
    ) -> str:
        if kind == "create":
            return (
                f"item {item_id} of store {store_id} was not admitted to create "
                f"its prediction within {timeout:g} s: the create rate "
                f"({self._limits.creates_per_minute:g} a minute) and the "
                f"{self._limits.max_in_flight} slots for predictions in flight "
                "are taken; `imageopt admission` shows by which stores"
            )
        return (
            f"a read for store {store_id} was not admitted within {timeout:g} s: "
            f"the read rate ({self._limits.reads_per_minute:g} a minute) is "
            "taken; `imageopt admission` shows by which stores"
        )

    def release(self, grant_or_item_id: Grant | int) -> None:
        """The item's prediction ended, or its create was never sent: free its slot.

        Safe to call more than once, and for an item whose slot another
        process took.
        """
        item_id = (
            grant_or_item_id.item_id
            if isinstance(grant_or_item_id, Grant)
            else int(grant_or_item_id)
        )
        with self._lock:
            self._held.pop(item_id, None)
            closing = self._closing
            if not closing:
                self._released.append(item_id)
        if closing:
            self._state.release_now([item_id])
        else:
            self._wake.set()

    def throttled(self, kind: str, retry_after: float) -> None:
        """The provider answered 429: lower the rate of ``kind`` for everyone.

        ``kind`` is ``"create"`` or ``"read"``; ``retry_after`` is the
        provider's, in seconds.
        """
        if kind not in KINDS:
            msg = f"a rate is 'create' or 'read', not {kind!r}"
            raise ValueError(msg)

        retry_after = max(0.0, float(retry_after))
        halved, per_minute = self._state.throttle(kind, retry_after)
        if halved:
            logger.warning(
                "the provider throttled %ss: none for %.1f s, then %.0f a minute, "
                "climbing back to %g within %.0f s",
                kind,
                retry_after,
                per_minute,
                self._limits.per_minute(kind),
                self._limits.recovery_seconds,
            )
        else:
            logger.debug(
                "the provider throttled %ss again: pausing them %.1f s more",
                kind,
                retry_after,
            )

    def snapshot(self) -> dict[str, Any]:
        """What `imageopt admission` shows, plus this agent's own counts."""
        view = self._state.snapshot(self._waiters)
        view["agent"] = {"passes": self.passes, "grants": self.grants}

        return view

    def close(self) -> None:
        """Stop the agent; threads still waiting get AdmissionClosedError.

        Slots still held stay taken until the lease runs out (their
        predictions may still be running), unless released first.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
        for waiter in self._waiters.drain():
            waiter.error = AdmissionClosedError(
                _closed_message(waiter.kind, waiter.store_id, waiter.item_id)
            )
            waiter.state = _DONE
            waiter.event.set()

        self._wake.set()
        if self._state.shared:
            # Wakes the listener at once rather than at its next timeout.
            with contextlib.suppress(psycopg.Error), self._db.connection() as conn:
                conn.execute("SELECT pg_notify(%s, '')", (_channel(self._agent),))
        for thread in self._threads:
            thread.join()

        # The agent has stopped: what it left is final.
        with self._lock:
            released, self._released = self._released, []
            holding = bool(self._held)
        if released:
            self._state.release_now(released)
        self._state.close(holding)

    # -- the agent ---------------------------------------------------------

    def _start(self) -> None:
        self._threads.append(
            threading.Thread(target=self._run, name="imageopt-admission", daemon=True)
        )
        if self._state.shared:
            self._threads.append(
                threading.Thread(
                    target=self._listen, name="imageopt-admission-notify", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        next_at: float | None = time.monotonic()
        failures = 0
        while True:
            renew_at = self._passed_at + self._limits.lease_seconds / 3.0
            deadline = renew_at if next_at is None else min(next_at, renew_at)
            self._wake.wait(max(0.0, deadline - time.monotonic()))
            if self._closing:
                return
            self._wake.clear()
            spacing = self._passed_at + PASS_SPACING - time.monotonic()
            if spacing > 0:
                time.sleep(spacing)

            try:
                wake_in = self._pass_once()
            except psycopg.Error as exc:
                failures += 1
                if failures == 1:
                    logger.warning(
                        "admission cannot reach the database (%s): waiting items "
                        "wait, and it tries again every few seconds",
                        exc,
                    )
                self._state.disconnect()
                next_at = time.monotonic() + min(5.0, 0.25 * 2**failures)
                continue
            except Exception:
                # A bug must not stop the agent: every waiter would hang.
                failures += 1
                logger.exception("admission's pass failed; trying again")
                next_at = time.monotonic() + min(5.0, 0.25 * 2**failures)
                continue

            if failures:
                logger.info("admission reached the database again")
                failures = 0
            next_at = None if wake_in is None else time.monotonic() + wake_in

    def _pass_once(self) -> float | None:
        with self._lock:
            released, self._released = self._released, []
            held = dict(self._held)
        try:
            result = self._state.run_pass(self._waiters, released, held)
        except BaseException:
            with self._lock:
                self._released[:0] = released
            raise
        self._passed_at = time.monotonic()

        with self._lock:
            self._registered = result.registered
            for waiter in result.taken:
                if waiter.kind == "create":
                    self._held[waiter.item_id] = waiter.store_id
        for waiter in result.taken:
            waiter.state = _DONE
            waiter.event.set()
        self.passes += 1
        self.grants += len(result.taken)

        return result.wake_in

    def _listen(self) -> None:
        """Wake the agent when another agent's pass granted it something."""
        channel = _channel(self._agent)
        while not self._closing:
            try:
                with psycopg.connect(self._db.conninfo, autocommit=True) as conn:
                    conn.execute(f'LISTEN "{channel}"')
                    # Grants made while nobody listened are collected now.
                    self._wake.set()
                    while not self._closing:
                        for _ in conn.notifies(timeout=5.0, stop_after=1):
                            self._wake.set()
            except psycopg.Error as exc:
                logger.debug("admission's listener lost the database: %s", exc)
                time.sleep(1.0)


def _closed_message(kind: str, store_id: int, item_id: int | None) -> str:
    what = f"item {item_id} of store {store_id}" if item_id else f"store {store_id}"
    return f"admission closed while {what} waited for a {kind} grant"
