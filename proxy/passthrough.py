"""Everything the proxy does not need to understand, forwarded to jupyter-server untouched.

Request and response bodies stream through in chunks (a 1 GB upload or download is never held
in memory); websockets it does not understand (Y rooms, terminals, events) are piped frame by
frame with their subprotocol and close code. App pages may have their page config rewritten
(:mod:`proxy.pages`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web

from .pages import AppPages
from .upstream import HOP_BY_HOP, Upstream, forwarded_headers, redact

log = logging.getLogger("jupyter_replay_proxy")


class PassThrough:
    """Forwards a request to jupyter-server; `answered(request, status)` hears of each
    POST to the kernels and sessions API (a kernel may have started or restarted) and each
    PATCH of a session (its notebook or kernel may have changed)."""

    def __init__(
        self,
        upstream: Upstream,
        pages: AppPages,
        answered: Callable[[web.Request, int], None],
    ) -> None:
        self.upstream = upstream
        self.pages = pages
        self.answered = answered

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._forward_websocket(request)
        response = await self._forward_http(request)
        api = self.upstream.base_url + "api/"
        changes_kernels = request.method == "POST" and request.path.startswith(
            (api + "kernels", api + "sessions")
        )
        changes_a_session = request.method == "PATCH" and request.path.startswith(api + "sessions")
        if changes_kernels or changes_a_session:
            self.answered(request, response.status)
        return response

    async def _forward_http(self, request: web.Request) -> web.StreamResponse:
        url = self.upstream.url(request.path_qs)
        body = request.content if request.body_exists else None
        headers = forwarded_headers(request.headers)
        if self.pages.may_be_app_page(request):
            headers.popall("Accept-Encoding", None)  # its page config is rewritten: plain text
        try:
            upstream = await self.upstream.http.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except aiohttp.ClientError as error:
            log.warning(
                "Upstream request failed: %s %s: %s", request.method, redact(request.path), error
            )
            return web.Response(status=502, text="jupyter-server is not reachable")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            if self.pages.is_app_page(request, upstream):
                return await self.pages.serve(request, upstream, response)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(256 * 1024):
                await response.write(chunk)
            await response.write_eof()
        return response

    async def _forward_websocket(self, request: web.Request) -> web.StreamResponse:
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        try:
            upstream = await self.upstream.http.ws_connect(
                self.upstream.url(request.path_qs), headers=forwarded_headers(request.headers),
                protocols=protocols, max_msg_size=0, autoping=False, autoclose=False,
            )  # fmt: skip
        except aiohttp.WSServerHandshakeError as error:
            return web.Response(status=error.status, text=error.message)
        except aiohttp.ClientError as error:
            log.warning("Upstream websocket failed: %s: %s", redact(request.path), error)
            return web.Response(status=502, text="jupyter-server is not reachable")
        downstream = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            max_msg_size=0, autoping=False, autoclose=False,
        )  # fmt: skip
        await downstream.prepare(request)

        async def pipe(
            source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
            target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        ) -> None:
            async for frame in source:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    await target.send_str(frame.data)
                elif frame.type == aiohttp.WSMsgType.BINARY:
                    await target.send_bytes(frame.data)
                elif frame.type == aiohttp.WSMsgType.PING:
                    await target.ping(frame.data)
                elif frame.type == aiohttp.WSMsgType.PONG:
                    await target.pong(frame.data)
                elif frame.type == aiohttp.WSMsgType.CLOSE:
                    await target.close(
                        code=frame.data or 1000, message=(frame.extra or "").encode()
                    )
                    break
            if not target.closed:
                await target.close(code=source.close_code or 1000)

        tasks = [
            asyncio.ensure_future(pipe(downstream, upstream)),
            asyncio.ensure_future(pipe(upstream, downstream)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()
            await downstream.close()
        return downstream
