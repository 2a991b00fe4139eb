-- Dashboard sessions and trace context (migration 007: dashboard and observability).

-- The W3C traceparent of whoever started the run. Step jobs are produced from the outbox,
-- not by that caller, so the runner reads the context here to make each step attempt's span
-- a child of the run's: one trace shows the whole run, across workers.
ALTER TABLE executor.runs ADD COLUMN traceparent text;

-- Logged-in dashboard sessions. The browser holds a signed random session id; this table
-- holds only its SHA-256, so reading the table gives no usable cookie. Logout deletes the
-- row, and "log out everywhere" deletes them all: a copied cookie is worthless after either.
CREATE TABLE executor.dashboard_sessions (
    session_hash      text PRIMARY KEY,
    role              text NOT NULL CHECK (role IN ('viewer', 'operator')),
    token_fingerprint text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL
);

CREATE INDEX dashboard_sessions_expires ON executor.dashboard_sessions (expires_at);
