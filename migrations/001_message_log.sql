-- The durable log of every kernel message the proxy relays, in both directions.

CREATE TABLE clients (
    client_id       TEXT PRIMARY KEY,   -- one websocket connection of a frontend
    kernel_id       TEXT NOT NULL,
    session_id      TEXT,               -- the channels URL's session_id
    username        TEXT,               -- as jupyter-server's /api/me reports the caller
    identity        TEXT,               -- the whole /api/me identity, JSON
    protocol        TEXT NOT NULL,      -- 'v1.kernel.websocket.jupyter.org' or 'legacy'
    remote          TEXT,
    connected_at    TEXT NOT NULL,
    disconnected_at TEXT
);

CREATE TABLE messages (
    seq            INTEGER PRIMARY KEY,  -- order in which the proxy relayed it
    kernel_id      TEXT NOT NULL,
    channel        TEXT NOT NULL,        -- shell, iopub, stdin, control
    direction      TEXT NOT NULL CHECK (direction IN ('to_kernel', 'from_kernel')),
    msg_id         TEXT,
    parent_msg_id  TEXT,
    msg_type       TEXT,
    session        TEXT,                 -- header.session
    username       TEXT,                 -- header.username
    client_id      TEXT REFERENCES clients (client_id),  -- sender, or the one reply went to
    msg_date       TEXT,                 -- header.date
    received_at    TEXT NOT NULL,        -- when the proxy received it, UTC ISO 8601
    header         TEXT NOT NULL,        -- JSON as received
    parent_header  TEXT NOT NULL,
    metadata       TEXT NOT NULL,
    content        TEXT NOT NULL,
    buffer_count   INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX messages_by_msg_id ON messages (msg_id);
CREATE INDEX messages_by_parent ON messages (parent_msg_id);
CREATE INDEX messages_by_kernel_seq ON messages (kernel_id, seq);

CREATE TABLE message_buffers (
    seq   INTEGER NOT NULL REFERENCES messages (seq) ON DELETE CASCADE,
    idx   INTEGER NOT NULL,
    data  BLOB NOT NULL,
    PRIMARY KEY (seq, idx)
) WITHOUT ROWID;

-- Small durable facts of the proxy itself, e.g. the session_id of a websocket link.
CREATE TABLE proxy_state (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- Messages with the authenticated user of the client they came from or went to.
CREATE VIEW messages_with_user AS
SELECT
    m.seq, m.kernel_id, m.channel, m.direction, m.msg_id, m.parent_msg_id, m.msg_type,
    m.session, m.username AS header_username, c.username AS user, m.client_id,
    m.msg_date, m.received_at, m.metadata, m.content
FROM messages AS m
LEFT JOIN clients AS c USING (client_id);
