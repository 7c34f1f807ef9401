-- imageopt: no-transaction
-- A canceled item or job is neither completed nor failed: the store asked for
-- it to stop. Outside a transaction for the same reason as 0002.

ALTER TYPE item_status ADD VALUE IF NOT EXISTS 'CANCELED';

ALTER TYPE job_status ADD VALUE IF NOT EXISTS 'CANCELED';
