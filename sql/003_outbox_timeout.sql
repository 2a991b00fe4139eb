-- The job timeout travels with the outbox row, so pushing a step's job needs no lookup.
ALTER TABLE executor.outbox ADD COLUMN timeout_seconds double precision;
