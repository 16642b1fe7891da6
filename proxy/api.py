"""The audit trail over HTTP, under the proxy's own prefix, described by an OpenAPI document.

Every call is authorized by jupyter-server with the caller's own credentials: the caller must
hold ``kernels: read`` there (asked through ``/api/me?permissions=``), and sees only kernels
jupyter-server lists for them; a caller to whom it lists every kernel the proxy follows also
sees the history of kernels that are gone.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from . import __version__, audit
from .upstream import Upstream, json_error

PAGE_DEFAULT, PAGE_MAX = 100, 1000

_FILTERS = {
    "kernel": "Kernel id.",
    "notebook": "Notebook path (as jupyter-server's sessions name it).",
    "session": "A frontend's session_id (the channels URL's) or a message header's session.",
    "user": "Authenticated user name, as jupyter-server's /api/me reported it.",
    "since": "ISO 8601 time (UTC unless given), or a duration ago such as 2h or 30d.",
    "until": "ISO 8601 time, or a duration ago.",
    "after": "Only entries with a sequence number above this (the previous page's next_after).",
    "limit": f"Page size (default {PAGE_DEFAULT}, at most {PAGE_MAX}).",
}
_MESSAGE_FILTERS = {
    "msg_type": "Message type; repeat for several.",
    "channel": "shell, iopub, stdin or control; repeat for several.",
    "parent": "Parent msg_id: the messages an execution caused.",
}


class AuditApi:
    """Request handlers of the audit trail."""

    def __init__(
        self,
        upstream: Upstream,
        connect: Callable[[], sqlite3.Connection],
        followed: Callable[[], set[str]],
    ) -> None:
        self.upstream = upstream
        self.connect = connect
        self.followed = followed

    def add_routes(self, app: web.Application, prefix: str) -> None:
        app.router.add_get(prefix + "openapi.json", self.openapi)
        app.router.add_get(prefix + "audit/messages", self.messages)
        app.router.add_get(prefix + "audit/executions", self.executions)
        app.router.add_get(prefix + "audit/export", self.export)
        app.router.add_get(prefix + "audit/stats", self.stats)
        self.prefix = prefix

    # --- handlers --------------------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.Response:
        await self.authorize(request)
        return web.json_response(openapi_document(self.prefix))

    async def messages(self, request: web.Request) -> web.Response:
        query = await self._filter(request, with_message_filters=True)
        found = await self._read(lambda conn: audit.messages(conn, query))
        return _page(found, query)

    async def executions(self, request: web.Request) -> web.Response:
        query = await self._filter(request)
        found = await self._read(lambda conn: audit.executions(conn, query))
        return _page([execution.as_json() for execution in found], query)

    async def export(self, request: web.Request) -> web.Response:
        query = await self._filter(request)
        if not (query.kernel or query.session or query.notebook):
            raise json_error(400, "export needs kernel, session or notebook")
        query.limit = None
        notebook = await self._read(lambda conn: audit.export_notebook(conn, query))
        name = (query.notebook or query.kernel or query.session or "export").rsplit("/", 1)[-1]
        return web.Response(
            text=audit.ipynb_text(notebook),
            content_type="application/x-ipynb+json",
            headers={"Content-Disposition": f'attachment; filename="{_safe(name)}.ipynb"'},
        )

    async def stats(self, request: web.Request) -> web.Response:
        visible = await self.authorize(request)
        if visible is not None:
            raise web.HTTPForbidden(
                text=json.dumps({"message": "log figures cover every kernel: not for you"}),
                content_type="application/json",
            )
        return web.json_response(await self._read(audit.stats))

    # --- helpers -----------------------------------------------------------------------------

    async def authorize(self, request: web.Request) -> frozenset[str] | None:
        """The kernels the caller may see (None: all), or the refusal jupyter-server gives."""
        status, listed = await self.upstream.readable_kernels(request)
        if status != 200 or listed is None:
            raise _refusal(status)
        if self.followed() <= listed:
            return None
        return frozenset(listed)

    async def _filter(
        self, request: web.Request, *, with_message_filters: bool = False
    ) -> audit.Filter:
        visible = await self.authorize(request)
        q = request.query
        try:
            limit = int(q.get("limit", PAGE_DEFAULT))
            after = int(q.get("after", 0))
            if not 1 <= limit <= PAGE_MAX:
                raise ValueError(f"limit must be between 1 and {PAGE_MAX}")
            query = audit.Filter(
                kernel=q.get("kernel"), notebook=q.get("notebook"), session=q.get("session"),
                user=q.get("user"), since=_time(q.get("since")), until=_time(q.get("until")),
                after=after, limit=limit, visible_kernels=visible,
            )  # fmt: skip
            if with_message_filters:
                query.msg_types = q.getall("msg_type", [])
                query.channels = q.getall("channel", [])
                query.parent = q.get("parent")
        except ValueError as error:  # QueryError is one
            raise json_error(400, str(error)) from None
        return query

    async def _read(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        def run() -> Any:
            conn = self.connect()
            try:
                return work(conn)
            finally:
                conn.close()

        return await asyncio.get_running_loop().run_in_executor(None, run)


def _time(text: str | None) -> datetime | None:
    return audit.parse_time(text) if text else None


def _page(items: list[dict[str, Any]], query: audit.Filter) -> web.Response:
    full = query.limit is not None and len(items) == query.limit
    return web.json_response(
        {"items": items, "next_after": items[-1]["seq"] if full else None},
        dumps=lambda value: json.dumps(value, default=str),
    )


def _refusal(status: int) -> web.HTTPException:
    """jupyter-server's answer passed on: 401 stays 401, any other refusal is a 403."""
    reason = "jupyter-server does not let the caller read kernels"
    return json_error(401 if status == 401 else 403, reason)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "export"


def openapi_document(prefix: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the audit API."""

    def parameters(names: dict[str, str], repeated: tuple[str, ...] = ()) -> list[dict]:
        found = []
        for name, description in names.items():
            schema: dict[str, Any] = {"type": "integer" if name in ("after", "limit") else "string"}
            if name in repeated:
                schema = {"type": "array", "items": {"type": "string"}}
            found.append(
                {"name": name, "in": "query", "description": description, "schema": schema}
            )
        return found

    def page_of(item: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
                "next_after": {"type": ["integer", "null"]},
            },
        }

    refused = {
        "400": {"description": "A filter could not be understood."},
        "403": {"description": "jupyter-server does not let the caller read kernels."},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jupyter-replay-proxy audit API",
            "version": __version__,
            "description": "The message log as an audit trail. Authenticate as with "
            "jupyter-server (token, cookie, headers): it decides.",
        },
        "paths": {
            prefix + "audit/messages": {
                "get": {
                    "summary": "Logged kernel messages, oldest first.",
                    "parameters": parameters(
                        {**_FILTERS, **_MESSAGE_FILTERS}, ("msg_type", "channel")
                    ),
                    "responses": {
                        "200": {
                            "description": "A page of messages.",
                            "content": {"application/json": {"schema": page_of("Message")}},
                        },
                        **refused,
                    },
                }
            },
            prefix + "audit/executions": {
                "get": {
                    "summary": "One entry per execution: who ran what, when, what came out.",
                    "parameters": parameters(_FILTERS),
                    "responses": {
                        "200": {
                            "description": "A page of executions.",
                            "content": {"application/json": {"schema": page_of("Execution")}},
                        },
                        **refused,
                    },
                }
            },
            prefix + "audit/export": {
                "get": {
                    "summary": "A notebook rebuilt from the log (kernel, session or notebook).",
                    "parameters": parameters(
                        {k: v for k, v in _FILTERS.items() if k not in ("after", "limit")}
                    ),
                    "responses": {
                        "200": {
                            "description": "nbformat 4 notebook.",
                            "content": {"application/x-ipynb+json": {"schema": {"type": "object"}}},
                        },
                        **refused,
                    },
                }
            },
            prefix + "audit/stats": {
                "get": {
                    "summary": "Figures about the whole log (for callers who see every kernel).",
                    "responses": {"200": {"description": "Counts, oldest entry, size."}, **refused},
                }
            },
        },
        "components": {
            "schemas": {
                "Message": _object_schema(_MESSAGE_FIELDS),
                "Execution": _object_schema(_EXECUTION_FIELDS),
            }
        },
    }


def _object_schema(fields: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {"type": "object", "properties": {name: {"type": kind} for name, kind in fields}}


_MESSAGE_FIELDS = (
    ("seq", "integer"), ("received_at", "string"), ("kernel_id", "string"),
    ("channel", "string"), ("direction", "string"), ("msg_type", "string"),
    ("msg_id", "string"), ("parent_msg_id", ["string", "null"]),
    ("session", ["string", "null"]), ("user", ["string", "null"]),
    ("client_id", ["string", "null"]), ("msg_date", ["string", "null"]),
    ("metadata", "object"), ("content", "object"), ("buffer_count", "integer"),
)  # fmt: skip
_EXECUTION_FIELDS = (
    ("seq", "integer"), ("kernel_id", "string"), ("msg_id", "string"),
    ("notebook_path", ["string", "null"]), ("cell_id", ["string", "null"]),
    ("user", ["string", "null"]), ("client_session", ["string", "null"]),
    ("session", ["string", "null"]), ("code", "string"), ("requested_at", "string"),
    ("started_at", ["string", "null"]), ("finished_at", ["string", "null"]),
    ("status", ["string", "null"]), ("execution_count", ["integer", "null"]),
    ("duration_s", ["number", "null"]), ("outputs", "array"),
)  # fmt: skip
