-- Admission's shared state: the token buckets for creates and reads, the slots
-- of predictions in flight, each store's place in the fair queue, and who is
-- waiting. Every process using this database reads and writes it through
-- imageopt/admission.py, always in a transaction that first locks the one row
-- of admission_clock, so grants are decided one pass at a time, whichever
-- process makes them.

-- The lock every pass takes, and the promise of the process that will run the
-- next pass when the next token is due; the others leave that timing to it and
-- wake when NOTIFY tells them a grant is theirs.
CREATE TABLE admission_clock (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    dispatcher     uuid,
    dispatch_at    timestamptz,
    -- The bound on predictions in flight, as the process that passed last
    -- read it; shown by `imageopt admission`.
    max_in_flight  integer
);

INSERT INTO admission_clock DEFAULT VALUES;

-- One token bucket for each kind of request: 'create' (prediction creations)
-- and 'read' (polls, and every other request to the provider).
CREATE TABLE admission_buckets (
    kind          text PRIMARY KEY CHECK (kind IN ('create', 'read')),
    -- The configured rate, as the process that granted last read it.
    per_minute    double precision NOT NULL CHECK (per_minute > 0),
    tokens        double precision NOT NULL,
    -- When tokens was counted. After a 429 it is the end of the pause the
    -- provider asked for: no token accrues before then.
    updated_at    timestamptz NOT NULL,
    -- The share of per_minute allowed since the provider last throttled; it
    -- climbs back to 1 from resume_at on.
    factor        double precision NOT NULL DEFAULT 1
                  CHECK (factor > 0 AND factor <= 1),
    resume_at     timestamptz NOT NULL DEFAULT 'epoch',
    -- The fair queue's virtual time: where the latest grant stood in it.
    virtual_time  double precision NOT NULL DEFAULT 0
);

INSERT INTO admission_buckets (kind, per_minute, tokens, updated_at)
VALUES ('create', 600, 0, now()), ('read', 3000, 0, now());

-- Each open Admission (normally one a process). Its slots and waiters live as
-- long as its lease, which it renews while it runs; whoever passes next after
-- the lease ran out deletes the row, and with it what it held.
CREATE TABLE admission_agents (
    id           uuid PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz NOT NULL
);

-- A store's place in the fair queue of one kind: its virtual time advances by
-- 1/weight with each grant, and the store with the lowest goes next.
CREATE TABLE admission_turns (
    kind      text NOT NULL CHECK (kind IN ('create', 'read')),
    store_id  bigint NOT NULL,
    vtime     double precision NOT NULL DEFAULT 0,
    -- Whether the store had waiters at the last pass; a store that starts
    -- waiting again is moved up to the others' virtual time.
    waiting   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (kind, store_id)
);

-- How many items (kind 'create') or polls (kind 'read') of a store wait in an
-- agent, and how many grants were made to them that the agent has not yet
-- collected.
CREATE TABLE admission_waiters (
    agent     uuid NOT NULL REFERENCES admission_agents (id) ON DELETE CASCADE,
    kind      text NOT NULL CHECK (kind IN ('create', 'read')),
    store_id  bigint NOT NULL,
    waiting   integer NOT NULL CHECK (waiting >= 0),
    granted   integer NOT NULL DEFAULT 0 CHECK (granted >= 0),
    PRIMARY KEY (agent, kind, store_id)
);

-- One row per prediction in flight: taken with a create grant, deleted when
-- the item's prediction ends.
CREATE TABLE admission_slots (
    item_id   bigint PRIMARY KEY,
    store_id  bigint NOT NULL,
    agent     uuid NOT NULL REFERENCES admission_agents (id) ON DELETE CASCADE,
    taken_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX admission_slots_agent_idx ON admission_slots (agent);

-- Grants per store and second, kept for two minutes, for `imageopt admission`.
CREATE TABLE admission_grants (
    kind      text NOT NULL CHECK (kind IN ('create', 'read')),
    store_id  bigint NOT NULL,
    second    timestamptz NOT NULL,
    grants    integer NOT NULL,
    PRIMARY KEY (kind, store_id, second)
);
