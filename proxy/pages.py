"""JupyterLab's and Notebook 7's pages, with server-side execution turned on: their page config
says ``serverSideExecution`` (jupyter-collaboration's executor then POSTs each cell to the
proxy) and loads the proxy's frontend plugin, which shows a server-side execution's input()
prompt in its cell."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

log = logging.getLogger("jupyter_replay_proxy")

_APP_PAGES = ("lab", "doc", "notebooks", "tree", "edit", "consoles")  # pages with page config
#: The proxy's frontend plugin (input() of server-side executions), as a federated extension.
LABEXTENSION = "jupyter-replay-proxy"
_LABEXTENSION = (Path(__file__).parent / "labextension" / "remoteEntry.js").read_bytes()


class AppPages:
    """Rewrites the page config of the app pages jupyter-server serves, while `enabled()`."""

    def __init__(self, base_url: str, enabled: Callable[[], bool]) -> None:
        self.base_url = base_url
        self.enabled = enabled

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(
            self.base_url + f"lab/extensions/{LABEXTENSION}/remoteEntry.js", self.labextension
        )

    async def labextension(self, request: web.Request) -> web.Response:
        """The plugin the app pages load: shows a cell's input() prompt of a server-side
        execution (stock JupyterLab only shows prompts of requests it sent itself)."""
        return web.Response(
            body=_LABEXTENSION,
            content_type="application/javascript",
            headers={"Cache-Control": "no-cache"},
        )

    def may_be_app_page(self, request: web.Request) -> bool:
        """A request for a JupyterLab or Notebook 7 page, whose page config turns server-side
        execution on."""
        return (
            self.enabled()
            and request.method == "GET"
            and request.path.startswith(tuple(self.base_url + p for p in _APP_PAGES))
        )

    def is_app_page(self, request: web.Request, upstream: aiohttp.ClientResponse) -> bool:
        return (
            self.may_be_app_page(request)
            and upstream.status == 200
            and upstream.content_type == "text/html"
            and "Content-Encoding" not in upstream.headers
        )

    async def serve(
        self, request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse
    ) -> web.StreamResponse:
        page = await upstream.read()
        marker = b'<script id="jupyter-config-data" type="application/json">'
        start = page.find(marker) + len(marker)
        end = page.find(b"</script>", start)
        if start >= len(marker) and end >= 0:
            try:
                config = json.loads(page[start:end])
            except ValueError:
                log.warning("Cannot read the page config of %s", request.path)
            else:  # jupyter-collaboration writes it too, as false; the lab reads "true" only
                config["serverSideExecution"] = "true"
                if config.get("fullLabextensionsUrl") == self.base_url + "lab/extensions":
                    extensions = config.setdefault("federated_extensions", [])
                    extensions.append(
                        {"name": LABEXTENSION, "load": "remoteEntry.js", "extension": "./extension"}
                    )
                rewritten = json.dumps(config).replace("</", "<\\/").encode()
                page = page[:start] + rewritten + page[end:]
        response.headers.popall("Content-Length", None)
        response.content_length = len(page)
        await response.prepare(request)
        await response.write(page)
        await response.write_eof()
        return response
