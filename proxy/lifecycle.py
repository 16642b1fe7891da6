"""A kernel's lifecycle, decided in one place: when an execution has finished, and what a
restart or the kernel's death means. Pure: fed messages, it says what happened.

An execute_request has *finished* once both its execute_reply (shell) and the kernel's idle
status for it (iopub) have passed: the reply can overtake the request's last outputs, and the
idle status follows them all (JupyterLab's futures wait for both too). One followed again after
a restart of the proxy ends at its idle status alone: its reply may have gone to the proxy that
stopped. A *restart* or the kernel's *death* ends every unfinished execution with what came of
it: a restarted kernel answers no earlier request. The relay core (:mod:`proxy.relay`) feeds
this and tells the taps; the audit view ``executions`` (migrations/005) applies the same rule
to the log.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from .codecs import Message

#: Statuses only jupyter-server makes (to its websockets): the kernel was restarted, or died.
RESTARTED_STATES = ("restarting", "autorestarting")
DEAD_STATE = "dead"
SERVER_STATES = (*RESTARTED_STATES, DEAD_STATE)
_SQL_SERVER_STATES = ", ".join(f"'{state}'" for state in SERVER_STATES)
#: Messages of the log looked back over for what a kernel left unfinished (a proxy linking
#: to it again): unanswered requests, unfinished executions.
LOOKBACK = 100_000
#: Unfinished executions followed per kernel at most (the oldest forgotten first).
MAX_FOLLOWED = 10_000


def execution_state(message: Message) -> str | None:
    """The execution_state of an iopub status message (None for any other message)."""
    if message.channel != "iopub" or message.msg_type != "status":
        return None
    try:
        state = json.loads(message.parts[3]).get("execution_state")
    except (ValueError, AttributeError):
        return None
    return state if isinstance(state, str) else None


def kernel_event(message: Message) -> str | None:
    """ "restarted" or "dead" for the statuses jupyter-server makes; None for any other message."""
    state = execution_state(message)
    if state in RESTARTED_STATES:
        return "restarted"
    return "dead" if state == DEAD_STATE else None


@dataclass
class _Progress:
    reply: Message | None = None
    idle: bool = False
    restored: bool = False  # followed again after a restart of the proxy


class Executions:
    """A kernel's unfinished execute_requests, and which of them a message finishes."""

    def __init__(self, restored: Iterable[str] = ()) -> None:
        self._followed: dict[str, _Progress] = {
            msg_id: _Progress(restored=True) for msg_id in restored
        }

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._followed

    def __len__(self) -> int:
        return len(self._followed)

    def requested(self, msg_id: str) -> None:
        if len(self._followed) >= MAX_FOLLOWED:
            del self._followed[next(iter(self._followed))]
        self._followed[msg_id] = _Progress()

    def passed(self, message: Message) -> tuple[str, Message | None] | None:
        """The execution this kernel message finishes, with its reply; None if none."""
        msg_id = message.parent_msg_id or ""
        progress = self._followed.get(msg_id)
        if progress is None:
            return None
        if message.channel == "shell" and message.msg_type == "execute_reply":
            progress.reply = message
        elif execution_state(message) == "idle":
            progress.idle = True
        else:
            return None
        if progress.idle and (progress.reply is not None or progress.restored):
            del self._followed[msg_id]
            return msg_id, progress.reply
        return None

    def end_all(self) -> list[tuple[str, Message | None]]:
        """The kernel restarted or died: every unfinished execution ends as it stands."""
        ended = [(msg_id, progress.reply) for msg_id, progress in self._followed.items()]
        self._followed.clear()
        return ended


#: The same rule on the log, for a proxy linking to a kernel again: its execute_requests (within
#: the last :lookback messages) still unfinished, oldest first. Followed again, one ends at its
#: idle status alone, so one whose idle status is logged has finished (its reply, if it is not
#: logged, went to the proxy that stopped); and none survives a restart or death of the kernel
#: (as the relay decided it, `kernel_events`; in logs older than that table, a server status).
UNFINISHED_EXECUTIONS = f"""
SELECT m.seq, m.msg_id, m.client_id, m.metadata
FROM messages AS m
WHERE m.kernel_id = :kernel AND m.direction = 'to_kernel' AND m.msg_type = 'execute_request'
  AND m.seq > (SELECT coalesce(max(seq), 0) FROM messages) - :lookback
  AND NOT EXISTS (
        SELECT 1 FROM messages AS i
        WHERE i.parent_msg_id = m.msg_id AND i.msg_type = 'status'
          AND json_extract(i.content, '$.execution_state') = 'idle'
    )
  AND NOT EXISTS (
        SELECT 1 FROM kernel_events AS e
        WHERE e.kernel_id = :kernel AND e.after_seq >= m.seq
    )
  AND NOT EXISTS (
        SELECT 1 FROM messages AS s
        WHERE s.kernel_id = :kernel AND s.seq > m.seq AND s.msg_type = 'status'
          AND json_extract(s.content, '$.execution_state') IN ({_SQL_SERVER_STATES})
    )
ORDER BY m.seq
"""
