"""Kernel channels through the proxy, against a real jupyter-server and ipykernel."""

from __future__ import annotations

import pytest

from proxy.codecs import V1_SUBPROTOCOL

from .conftest import JupyterServer, RunningProxy, open_channels, stream_text

PROTOCOLS = [V1_SUBPROTOCOL, None]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["v1", "legacy"])
async def test_execute_through_proxy(
    proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str, protocol: str | None
) -> None:
    client = await open_channels(proxy.url, kernel_id, jupyter_server.token, protocol=protocol)
    try:
        assert client.protocol == (protocol or "legacy")
        _, reply, iopub = await client.execute("print('hello', 6 * 7)")
        assert reply.content()["status"] == "ok"
        assert stream_text(iopub) == "hello 42\n"
        types = [m.msg_type for m in iopub]
        assert types[0] == "status" and types[-1] == "status"
        assert "execute_input" in types
    finally:
        await client.close()
