-- The log as an audit trail: which notebook each kernel served, one row per execution,
-- the outputs of each execution, and room for buffers left out of the log for their size.

-- Each notebook (or console, or file) path jupyter-server's sessions attached to a kernel.
CREATE TABLE kernel_notebooks (
    kernel_id      TEXT NOT NULL,
    path           TEXT NOT NULL,
    session_type   TEXT,                 -- 'notebook', 'console', ...
    first_seen_at  TEXT NOT NULL,
    last_seen_at   TEXT NOT NULL,
    PRIMARY KEY (kernel_id, path)
) WITHOUT ROWID;

-- A buffer over the configured size is not stored: its data is empty and this is its size.
ALTER TABLE message_buffers ADD COLUMN omitted_size INTEGER;

CREATE INDEX messages_executions ON messages (kernel_id, seq)
WHERE msg_type = 'execute_request';

-- The messages of a connection (iopub, sent to every client, names none): for retention,
-- which forgets a connection once it has no message left.
CREATE INDEX messages_by_client ON messages (client_id)
WHERE client_id IS NOT NULL;

-- One row per execution: who ran what code where, when, and how it ended.
CREATE VIEW executions AS
SELECT
    request.seq,
    request.kernel_id,
    request.msg_id,
    (
        SELECT path FROM kernel_notebooks AS k
        WHERE k.kernel_id = request.kernel_id
        ORDER BY k.last_seen_at DESC
        LIMIT 1
    ) AS notebook_path,
    json_extract(request.metadata, '$.cellId') AS cell_id,
    COALESCE(client.username, request.username) AS user,
    client.session_id AS client_session,
    request.session,
    json_extract(request.content, '$.code') AS code,
    request.received_at AS requested_at,
    started.received_at AS started_at,
    reply.received_at AS finished_at,
    json_extract(reply.content, '$.status') AS status,
    COALESCE(
        json_extract(reply.content, '$.execution_count'),
        json_extract(started.content, '$.execution_count')
    ) AS execution_count,
    -- run time by the kernel's own clock (execute_input to execute_reply), else as received
    round(max(0.0, COALESCE(
        julianday(reply.msg_date) - julianday(started.msg_date),
        julianday(reply.received_at) - julianday(COALESCE(started.received_at,
            request.received_at))
    ) * 86400.0), 6) AS duration_s
FROM messages AS request
LEFT JOIN clients AS client ON client.client_id = request.client_id
LEFT JOIN messages AS started ON started.seq = (
    SELECT seq FROM messages
    WHERE parent_msg_id = request.msg_id AND msg_type = 'execute_input'
    ORDER BY seq LIMIT 1
)
LEFT JOIN messages AS reply ON reply.seq = (
    SELECT seq FROM messages
    WHERE parent_msg_id = request.msg_id AND msg_type = 'execute_reply'
    ORDER BY seq LIMIT 1
)
WHERE request.msg_type = 'execute_request' AND request.direction = 'to_kernel';

-- What came out: every iopub message that changes a cell's outputs, with its execution.
CREATE VIEW outputs AS
SELECT
    seq,
    kernel_id,
    parent_msg_id AS execution_msg_id,
    msg_type,
    received_at,
    content
FROM messages
WHERE channel = 'iopub'
    AND msg_type IN (
        'stream', 'display_data', 'update_display_data', 'execute_result', 'error',
        'clear_output'
    );
