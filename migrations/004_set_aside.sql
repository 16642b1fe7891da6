-- Rows the log writer could not write, kept here instead of stopping the log for everyone:
-- a value SQLite refused, a constraint a row broke. (The writer turns whatever it binds into
-- text first, so this is defence in depth.)

CREATE TABLE set_aside (
    id            INTEGER PRIMARY KEY,
    set_aside_at  TEXT NOT NULL,
    kind          TEXT NOT NULL,   -- message, buffer, client, client_left, delivery, notebook
    seq           INTEGER,         -- a message's sequence number
    kernel_id     TEXT,
    reason        TEXT NOT NULL,   -- what SQLite (or the writer) said
    row           TEXT NOT NULL    -- the row as the writer had it, as JSON
);
