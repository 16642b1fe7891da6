"""The process's log lines: every logger (the proxy's, aiohttp's, the libraries') through the
application's handlers in Jupyter's format, with credentials masked in each record; a request
that is not HTTP is one line saying so, not a traceback."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

from .upstream import redact

_FORMATTER = logging.Formatter()


class Masking(logging.Filter):
    """Masks tokens and cookies in a record's message, traceback and stack (a handler's filter:
    it sees every record the handler writes, whichever logger made it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and record.name.startswith("aiohttp"):
            # aiohttp logs a request it cannot parse with its traceback; the head it quotes
            # may carry credentials, and the sender's mistake is no error of the proxy's
            what = " ".join(line.strip() for line in error.message.splitlines() if line.strip())
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = "Bad HTTP request from %s: %s", (remote, what[:300])
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = redact(record.getMessage()), ()
        if record.exc_info:
            record.exc_text = redact(record.exc_text or _FORMATTER.formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def route_to(handlers: list[logging.Handler], level: int | str) -> None:
    """Send every logger of the process to `handlers` (the application's), masking secrets:
    the proxy's modules at `level`, everything else (aiohttp, asyncio...) from WARNING."""
    for handler in handlers:
        if not any(isinstance(f, Masking) for f in handler.filters):
            handler.addFilter(Masking())
    modules = logging.getLogger("jupyter_replay_proxy")
    modules.handlers, modules.propagate = list(handlers), False
    modules.setLevel(level)
    root = logging.getLogger()
    root.handlers = list(handlers)
    root.setLevel(logging.WARNING)
