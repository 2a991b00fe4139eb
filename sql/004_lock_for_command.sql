-- The handler's first round trip as one call: lock the run, then its steps in key order,
-- then read the idempotency key. In a VOLATILE PL/pgSQL function every query takes a new
-- snapshot, so the steps and the receipt are read as committed by whoever held the run lock
-- before us (exactly as three separate statements would read them), in one statement.
CREATE FUNCTION executor.lock_for_command(p_run_id text, p_key text, p_with_steps boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_run jsonb;
    v_steps jsonb := '[]';
    v_outcome text;
    v_received timestamptz;
BEGIN
    SELECT to_jsonb(r) INTO v_run
    FROM (
        SELECT run_id, workflow, status, concurrency_key, input, output, error, last_seq
        FROM executor.runs WHERE run_id = p_run_id FOR UPDATE
    ) AS r;
    IF p_with_steps AND v_run IS NOT NULL THEN
        SELECT coalesce(jsonb_agg(to_jsonb(s)), '[]') INTO v_steps
        FROM (
            SELECT step_key, status, attempt, max_attempts, depends_on, queue, timeout_seconds,
                   backoff, output, error, lease_expires_at, next_attempt_at
            FROM executor.steps WHERE run_id = p_run_id ORDER BY step_key FOR UPDATE
        ) AS s;
    END IF;
    SELECT outcome, received_at INTO v_outcome, v_received
    FROM executor.receipts WHERE idempotency_key = p_key;
    RETURN jsonb_build_object(
        'run', v_run,
        'steps', v_steps,
        'outcome', v_outcome,
        'received_at', v_received,
        'now', clock_timestamp()
    );
END
$$;
