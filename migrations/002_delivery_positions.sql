-- Where each frontend session stands in each kernel's log: the last message it acknowledged.
-- A client reconnecting with the same session_id is sent what came after, from the log.

CREATE TABLE deliveries (
    kernel_id   TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (kernel_id, session_id)
) WITHOUT ROWID;

CREATE INDEX clients_by_session ON clients (kernel_id, session_id);
