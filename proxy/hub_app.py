"""`jupyter-replay-proxy hub-transcript`: the audit trails of every running user server of a
JupyterHub, in one place, for a hub admin. It asks the hub which servers run (with a token the
hub gives `list:users`, `read:servers` and `access:servers`, e.g. an admin's or a service's),
then each server's sidecar for its executions through the hub's proxy, with the same token: a
server answers only what the hub's scopes grant."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import aiohttp
from traitlets import Enum, Unicode
from yarl import URL

from . import __version__, audit
from .app import CommandError, StrictApp

#: Executions asked for at a time (the audit API's largest page).
_PAGE = 1000


class HubTranscriptApp(StrictApp):
    name = "jupyter-replay-proxy-hub-transcript"
    version = __version__
    description = "Who ran what, on every running user server of a JupyterHub (for its admins)."
    aliases = {
        "hub-url": "HubTranscriptApp.hub_url",
        "token": "HubTranscriptApp.token",
        "user": "HubTranscriptApp.user",
        "format": "HubTranscriptApp.format",
    }

    hub_url = Unicode(
        "", config=True, help="The hub's public URL (default: $JUPYTERHUB_PUBLIC_URL)."
    )
    token = Unicode(
        "",
        config=True,
        help="A hub token with list:users, read:servers and access:servers "
        "(default: $JUPYTERHUB_API_TOKEN).",
    )
    user = Unicode("", config=True, help="Only this user's servers.")
    format = Enum(["text", "json"], "text", config=True, help="Output format.")

    def start(self) -> None:
        hub = self.hub_url or os.environ.get("JUPYTERHUB_PUBLIC_URL", "")
        token = self.token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if not hub or not token:
            raise CommandError("give the hub's URL (--hub-url) and an admin's token (--token)")
        asyncio.run(self._print(URL(hub.rstrip("/") + "/"), token))

    async def _print(self, hub: URL, token: str) -> None:
        headers = {"Authorization": f"token {token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            for user, server, url in await self._servers(http, hub):
                items = await self._executions(http, hub.join(URL(url)))
                if items is None:
                    continue
                if self.format == "json":
                    for item in items:
                        print(json.dumps({"hub_user": user, "server": server, **item}))
                    continue
                print(f"== {user}{'/' + server if server else ''} ({url}): "
                      f"{len(items)} executions")  # fmt: skip
                for line in audit.transcript_lines(items):
                    print(line)

    async def _servers(self, http: aiohttp.ClientSession, hub: URL) -> list[tuple[str, str, str]]:
        """(user, server name, server URL path) of every ready server."""
        try:
            async with http.get(hub / "hub/api/users", params={"state": "ready"}) as resp:
                if resp.status in (401, 403):
                    raise CommandError(
                        f"the hub refused the token ({resp.status}): it needs list:users, "
                        "read:servers and access:servers",
                        1,
                    )
                resp.raise_for_status()
                users: list[dict[str, Any]] = await resp.json()
        except (aiohttp.ClientError, ValueError) as error:
            raise CommandError(f"cannot list the hub's users at {hub}: {error}", 1) from None
        return [
            (model["name"], server, info["url"])
            for model in users
            if not self.user or model["name"] == self.user
            for server, info in (model.get("servers") or {}).items()
            if info.get("ready") and info.get("url")
        ]

    async def _executions(
        self, http: aiohttp.ClientSession, server: URL
    ) -> list[dict[str, Any]] | None:
        """A server's executions, oldest first; None (said on stderr) if it does not answer."""
        found: list[dict[str, Any]] = []
        after = 0
        while True:
            url = server / "replay-proxy/api/audit/executions"
            try:
                async with http.get(url, params={"after": after, "limit": _PAGE}) as resp:
                    if resp.status != 200:
                        print(f"{server}: {resp.status} (no replay proxy, or not yours to read)",
                              file=sys.stderr)  # fmt: skip
                        return None
                    page = await resp.json()
            except (aiohttp.ClientError, ValueError) as error:
                print(f"{server}: {error}", file=sys.stderr)
                return None
            found.extend(page["items"])
            if page["next_after"] is None:
                return found
            after = page["next_after"]
