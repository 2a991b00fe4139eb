-- Migration 009 made the run's and the receipt's checked columns domains; the steps' and the
-- events' columns follow. Every command writes a step row and an event, and Postgres reads
-- each CHECK of a table it writes from the stored node tree again for every statement:
-- these six cost 286k instructions a command, 16% of its server time. A domain's
-- check is kept parsed in the type cache and runs only when a statement assigns the column.
CREATE DOMAIN executor.step_status AS text CHECK (VALUE IN (
    'pending', 'queued', 'running', 'sleeping', 'waiting', 'retrying', 'completed', 'failed',
    'cancelled'));
CREATE DOMAIN executor.step_kind AS text CHECK (VALUE IN (
    'task', 'sleep', 'wait', 'child', 'map', 'item'));
CREATE DOMAIN executor.event_type AS text CHECK (VALUE IN (
    'run_created', 'run_queued', 'run_admitted', 'run_started', 'run_paused', 'run_resumed',
    'run_completed', 'run_failed', 'run_cancelled', 'step_created', 'step_queued',
    'step_started', 'step_completed', 'step_failed', 'step_retrying', 'step_cancelled',
    'step_sleeping', 'step_waiting', 'event_received'));
CREATE DOMAIN executor.drop_reason AS text CHECK (VALUE IN (
    'duplicate', 'stale_attempt', 'terminal', 'invalid_transition', 'unknown_entity',
    'invalid_payload', 'key_taken', 'paused', 'not_due', 'busy'));
CREATE DOMAIN executor.attempt_limit AS integer CHECK (VALUE >= 1);
CREATE DOMAIN executor.upstream_count AS integer CHECK (VALUE >= 0);
CREATE DOMAIN executor.event_seq AS bigint CHECK (VALUE >= 1);

ALTER TABLE executor.steps
    DROP CONSTRAINT steps_status_check,
    ALTER COLUMN status TYPE executor.step_status,
    DROP CONSTRAINT steps_kind_check,
    ALTER COLUMN kind TYPE executor.step_kind,
    DROP CONSTRAINT steps_max_attempts_check,
    ALTER COLUMN max_attempts TYPE executor.attempt_limit,
    DROP CONSTRAINT steps_waiting_on_check,
    ALTER COLUMN waiting_on TYPE executor.upstream_count;
ALTER TABLE executor.events
    DROP CONSTRAINT events_type_check,
    ALTER COLUMN type TYPE executor.event_type,
    DROP CONSTRAINT events_seq_check,
    ALTER COLUMN seq TYPE executor.event_seq;
ALTER TABLE executor.drops
    DROP CONSTRAINT drops_reason_check,
    ALTER COLUMN reason TYPE executor.drop_reason;

-- The runs' two rules over several columns (I5: an active run with a key holds a slot below
-- the key's limit) cannot be domains. As CHECKs they cost every command 94k instructions,
-- 6%, on every run, and most runs have no key. A row trigger whose WHEN clause lets only
-- rows with a key or a slot through enforces the same rules for 23k; a CHECK calling a
-- function, 42k. The unique index on (key, slot) stays the guarantee that a slot has one
-- holder.
CREATE FUNCTION executor.check_run_slot() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.concurrency_slot IS NOT NULL
       AND NOT (NEW.concurrency_slot >= 0 AND NEW.concurrency_slot < NEW.concurrency_limit)
    THEN
        RAISE check_violation USING
            MESSAGE = format('run %s: slot %s is not below its key''s limit %s',
                             NEW.run_id, NEW.concurrency_slot, NEW.concurrency_limit),
            CONSTRAINT = 'runs_slot_below_limit', TABLE = 'runs', SCHEMA = 'executor';
    END IF;
    IF NEW.concurrency_key IS NOT NULL
       AND (NEW.status IN ('pending', 'running', 'paused')) <> (NEW.concurrency_slot IS NOT NULL)
    THEN
        RAISE check_violation USING
            MESSAGE = format('run %s: status %s with slot %s (an active run with a key '
                             'holds a slot, an inactive one none)',
                             NEW.run_id, NEW.status, coalesce(NEW.concurrency_slot::text, 'none')),
            CONSTRAINT = 'runs_active_holds_slot', TABLE = 'runs', SCHEMA = 'executor';
    END IF;
    RETURN NEW;
END
$$;
ALTER TABLE executor.runs
    DROP CONSTRAINT runs_slot_below_limit,
    DROP CONSTRAINT runs_active_holds_slot;
CREATE TRIGGER runs_slot_rules
    BEFORE INSERT OR UPDATE ON executor.runs
    FOR EACH ROW
    WHEN (NEW.concurrency_key IS NOT NULL OR NEW.concurrency_slot IS NOT NULL)
    EXECUTE FUNCTION executor.check_run_slot();
