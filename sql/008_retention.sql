-- Retention finds terminal runs by their last update, oldest first, a batch at a time; the
-- index covers only terminal runs, so it stays out of the way of active ones. IF NOT EXISTS:
-- on a large ledger an operator may build it CONCURRENTLY by hand first (docs/retention.md).
CREATE INDEX IF NOT EXISTS runs_terminal_updated ON executor.runs (updated_at, run_id)
    WHERE status IN ('completed', 'failed', 'cancelled');
