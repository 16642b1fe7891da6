"""The jupyter-server behind the proxy: how to reach it, as the proxy and as a client.

The proxy's own token is only ever used for the proxy's own work (following kernels, holding
presence). Whether a client may do something is asked of jupyter-server with that client's own
credentials, exactly as the client sent them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

log = logging.getLogger("jupyter_replay_proxy.upstream")

#: Headers that describe one hop, not the request (RFC 9110 §7.6.1), and websocket handshake
#: headers that aiohttp makes anew for the upstream side.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "sec-websocket-key",
        "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)  # fmt: skip

#: Credentials as they appear in URLs and request heads, raw or quoted in an exception's text
#: (where a line end reads \r\n): a token parameter, an Authorization header, cookies.
_TOKENS = re.compile(
    r"""(token=|authorization:[ \t]*(?:token|bearer|basic)[ \t]+)(?:[^&\s'"\\]|\\(?![rn]))+""",
    re.IGNORECASE,
)
_COOKIES = re.compile(r"""((?:set-)?cookie:[ \t]*)(?:[^\r\n'"\\]|\\(?![rn]))+""", re.IGNORECASE)
#: jupyter-server's kernel ids as its URLs match them (``\w+-\w+-\w+-\w+-\w+`` on the raw path).
_KERNEL_ID = re.compile(r"[0-9A-Za-z_]+(?:-[0-9A-Za-z_]+){4}")


def redact(text: str) -> str:
    """Hide credentials in anything that may end up in a log."""
    return _COOKIES.sub(r"\1[secret]", _TOKENS.sub(r"\1[secret]", text))


#: JupyterLab creates a notebook's session under a random path (a UUID in the notebook's
#: folder), then renames it to the notebook's path.
_PLACEHOLDER = re.compile(r"(?:^|/)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def is_placeholder_path(path: str) -> bool:
    """Whether a session's path is JupyterLab's placeholder, not a document."""
    return _PLACEHOLDER.search(path) is not None


def is_kernel_id(text: str) -> bool:
    """Whether a URL segment can be a kernel id: one plain path segment, nothing to resolve."""
    return len(text) <= 128 and _KERNEL_ID.fullmatch(text) is not None


#: What describes a request's body: not for a probe the proxy makes without that body.
_BODY_HEADERS = frozenset({"content-length", "content-type", "content-encoding", "expect"})


def forwarded_headers(headers: CIMultiDict[str] | Any) -> CIMultiDict[str]:
    """The request's end-to-end headers, Host and credentials included, as they were sent."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


def credential_headers(headers: CIMultiDict[str] | Any) -> CIMultiDict[str]:
    """The request's headers for a bodiless request of the proxy's own on the caller's behalf
    (an admission probe, /api/me): the credentials, without what describes the body."""
    return CIMultiDict(
        (k, v) for k, v in forwarded_headers(headers).items() if k.lower() not in _BODY_HEADERS
    )


class Upstream:
    """One jupyter-server: its origin, base URL, and the proxy's token for it."""

    def __init__(self, url: str, token: str | None) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"upstream must be an http(s) URL, got {url!r}")
        self.origin = parsed.origin()
        path = parsed.path if parsed.path.endswith("/") else parsed.path + "/"
        self.base_url = path
        self.token = token
        self.session: aiohttp.ClientSession | None = None

    def __str__(self) -> str:
        return str(self.origin.with_path(self.base_url))

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # never keep one client's cookies for another
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None, "Upstream.start() first"
        return self.session

    def url(self, path_qs: str) -> URL:
        """An absolute upstream URL for a path (with query) as the client asked for it."""
        return self.origin.join(URL(path_qs, encoded=True))

    def api(self, path: str) -> URL:
        return self.origin.with_path(self.base_url + path)

    def own_headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def polled(self, path: str) -> URL:
        """An API URL the proxy polls on its own: not the user's activity, which
        jupyter-server reports to JupyterHub (whose idle culler would never stop the server)."""
        return self.api(path).with_query(no_track_activity="1")

    async def running_kernels(self) -> list[str]:
        async with self.http.get(self.polled("api/kernels"), headers=self.own_headers()) as resp:
            resp.raise_for_status()
            return [kernel["id"] for kernel in await resp.json()]

    async def sessions(self) -> list[dict[str, Any]]:
        """jupyter-server's sessions: which notebook (console, file) uses which kernel."""
        async with self.http.get(self.polled("api/sessions"), headers=self.own_headers()) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def has_kernel(self, kernel_id: str) -> bool:
        url = self.polled(f"api/kernels/{kernel_id}")
        async with self.http.get(url, headers=self.own_headers()) as resp:
            return resp.status == 200

    async def channels_websocket(
        self, kernel_id: str, session_id: str
    ) -> aiohttp.ClientWebSocketResponse:
        """A channels websocket of the proxy's own, in the v1 protocol."""
        url = self.api(f"api/kernels/{kernel_id}/channels").with_query(session_id=session_id)
        return await self.http.ws_connect(
            url, headers=self.own_headers(), protocols=("v1.kernel.websocket.jupyter.org",),
            max_msg_size=0, autoping=True, heartbeat=30,
        )  # fmt: skip

    async def admit(self, request: web.Request, kernel_id: str) -> int:
        """What jupyter-server answers this client's own channels handshake for the kernel.

        101 means admitted. The probe uses a session_id of its own (jupyter-server makes it the
        identity of its sockets to the kernel: one per probe, so that concurrent probes do not
        replace each other) so that it never takes jupyter-server's buffer of the client's
        session, and closes at once.
        """
        query = dict(request.query)
        query["session_id"] = f"replay-proxy-admission-{secrets.token_hex(8)}"
        url = self.api(f"api/kernels/{kernel_id}/channels").with_query(query)
        try:
            ws = await self.http.ws_connect(url, headers=credential_headers(request.headers))
        except aiohttp.WSServerHandshakeError as error:
            return error.status
        await ws.close()
        return 101

    async def readable_kernels(self, request: web.Request) -> tuple[int, set[str] | None]:
        """The kernels jupyter-server lets the caller read, asked with the caller's own
        credentials: its permission (``/api/me?permissions=``), then its list of kernels."""
        query = {k: v for k, v in request.query.items() if k == "token"}
        headers = credential_headers(request.headers)
        wanted = json.dumps({"kernels": ["read"]})
        me = self.api("api/me").with_query({**query, "permissions": wanted})
        async with self.http.get(me, headers=headers) as resp:
            if resp.status != 200:
                return resp.status, None
            granted = (await resp.json()).get("permissions", {}).get("kernels", [])
        if "read" not in granted:
            return 403, None
        async with self.http.get(
            self.api("api/kernels").with_query(query), headers=headers
        ) as resp:
            if resp.status != 200:
                return resp.status, None
            return 200, {kernel["id"] for kernel in await resp.json()}

    async def metrics_allowed(self, request: web.Request) -> int:
        """What jupyter-server answers the caller for its own /metrics (200: allowed), asked
        with the caller's own credentials: the proxy's metrics are for whom it shows its own."""
        query = {k: v for k, v in request.query.items() if k == "token"}
        headers = credential_headers(request.headers)
        async with self.http.get(self.api("metrics").with_query(query), headers=headers) as resp:
            await resp.read()
            return resp.status

    async def identity(self, request: web.Request) -> tuple[int, dict[str, Any] | None]:
        """jupyter-server's /api/me for the caller, asked with the caller's credentials."""
        query = {k: v for k, v in request.query.items() if k == "token"}
        headers = credential_headers(request.headers)
        async with self.http.get(self.api("api/me").with_query(query), headers=headers) as resp:
            if resp.status != 200:
                return resp.status, None
            body = await resp.read()
        try:
            return 200, json.loads(body).get("identity") or {}
        except ValueError:
            return 502, None


def json_error(status: int, reason: str) -> web.HTTPException:
    """An error of the proxy's own endpoints, as jupyter-server words them: {"message": ...}.
    Statuses other than 400, 401 and 404 become 403."""
    kinds = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 404: web.HTTPNotFound}
    kind = kinds.get(status, web.HTTPForbidden)
    return kind(text=json.dumps({"message": reason}), content_type="application/json")


class Backoff:
    """The wait between two attempts to reach jupyter-server: 0.25 s, doubled each time up to
    5 s, and back to 0.25 s once an attempt succeeded."""

    FIRST, MOST = 0.25, 5.0

    def __init__(self) -> None:
        self.delay = self.FIRST

    def succeeded(self) -> None:
        self.delay = self.FIRST

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.MOST)
