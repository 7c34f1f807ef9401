-- The schema as the system imageopt replaces left it: stores, jobs, items and
-- each item's history. Its item_status has no PROCESSING; 0002 adds it. Keep
-- this file as it is: databases at version 1 exist and must be rebuilt the
-- same way in tests.

CREATE TYPE item_status AS ENUM ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED');

CREATE TYPE job_status AS ENUM ('SUBMITTED', 'RUNNING', 'COMPLETED', 'FAILED');

CREATE TABLE stores (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    -- Share of the provider's capacity relative to other waiting stores.
    weight      integer NOT NULL DEFAULT 1 CHECK (weight > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store_id     bigint NOT NULL REFERENCES stores (id),
    status       job_status NOT NULL DEFAULT 'SUBMITTED',
    -- Optimizer options for every item: format, quality, max_width, max_height.
    params       jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_store_id_idx ON jobs (store_id);

CREATE TABLE items (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id         bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- Where the image comes from: a URL, or a file the submission stored.
    source         text NOT NULL,
    status         item_status NOT NULL DEFAULT 'PENDING',
    prediction_id  text,
    bytes_in       bigint,
    bytes_out      bigint,
    output         text,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX items_job_id_status_idx ON items (job_id, status);

CREATE TABLE item_history (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item_id      bigint NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    from_status  item_status,
    to_status    item_status NOT NULL,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    reason       text
);

CREATE INDEX item_history_item_id_idx ON item_history (item_id, at);
