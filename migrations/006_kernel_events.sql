-- What happened to a kernel that no message of its own says: jupyter-server restarted it (on
-- a request through the proxy, or by itself) or it died, as the relay decided it
-- (proxy/lifecycle.py). A restart requested over jupyter-server's REST API leaves no message in
-- the log; without this row, a proxy started later would take an execution the restart ended
-- for one still running.
CREATE TABLE kernel_events (
    kernel_id   TEXT NOT NULL,
    event       TEXT NOT NULL,          -- 'restarted' or 'dead'
    after_seq   INTEGER NOT NULL,       -- the last message logged before it
    happened_at TEXT NOT NULL
);

CREATE INDEX kernel_events_by_kernel ON kernel_events (kernel_id, after_seq);
