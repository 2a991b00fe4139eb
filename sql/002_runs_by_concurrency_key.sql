-- The dashboard filters runs by concurrency key, finished ones included; the partial unique
-- index only covers active runs.
CREATE INDEX runs_concurrency_key_created
    ON executor.runs (concurrency_key, created_at DESC, run_id DESC)
    WHERE concurrency_key IS NOT NULL;
