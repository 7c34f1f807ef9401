-- imageopt: no-transaction
-- PROCESSING separates "creating the prediction" (RUNNING) from "waiting for
-- its result". ALTER TYPE ... ADD VALUE may not be used in the transaction that
-- adds it, so this file runs outside one; IF NOT EXISTS makes a rerun after a
-- crash harmless.

ALTER TYPE item_status ADD VALUE IF NOT EXISTS 'PROCESSING' AFTER 'RUNNING';
