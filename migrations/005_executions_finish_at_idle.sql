-- An execution has finished once both its reply and the kernel's idle status for it are in the
-- log (the reply can overtake the last outputs; idle follows them all), as the proxy decides it
-- live (proxy/lifecycle.py): finished_at is the later of the two, NULL until both came.
DROP VIEW executions;

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
    CASE WHEN idle.seq IS NOT NULL THEN max(reply.received_at, idle.received_at) END
        AS finished_at,
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
LEFT JOIN messages AS idle ON idle.seq = (
    SELECT seq FROM messages
    WHERE parent_msg_id = request.msg_id AND msg_type = 'status'
      AND json_extract(content, '$.execution_state') = 'idle'
    ORDER BY seq LIMIT 1
)
WHERE request.msg_type = 'execute_request' AND request.direction = 'to_kernel';
