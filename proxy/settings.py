"""What the proxy needs to run, as one object: filled from traitlets config by :mod:`proxy.app`
(or by the tests), read by the parts that need it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ProxySettings:
    """What the proxy application needs to run; filled from traitlets config by proxy.app."""

    runtime_dir: Path
    link: str = "auto"  # "auto", "zmq" or "websocket"
    max_frame_size: int = 64 * 1024 * 1024
    max_client_queue: int = 10_000
    max_client_queue_bytes: int = 8 * 1024 * 1024
    replay_window: float = 24 * 3600
    kernel_poll_interval: float = 1.0
    websocket_link_session_id: str = ""
    allowed_message_types: frozenset[str] = frozenset()  # empty: all, as in jupyter-server
    link_namespace: str = "replay-proxy"  # the log's path: stable ids per (log, kernel)
    write_outputs: bool = True  # take over outputs of executions whose client left
    server_side_execution: bool = True  # serve POST /api/kernels/{id}/execute; pages use it
    handoff_grace: float = 5.0  # seconds a client may be gone before the proxy writes for it
    spool_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spool-")))
    """where the kernels' iopub waits until it is in the log (beside the log: it outlives a
    proxy that is killed, for the next one)"""
