"""The Prometheus metrics, scraped after real traffic and read with prometheus_client's parser."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .conftest import JupyterServer, RunningProxy, open_channels


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_after_real_traffic(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    url = zmq_proxy.url + "replay-proxy/metrics"
    client = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
        try:
            for i in range(3):
                await client.execute(f"print({i})")
            async with http.post(
                zmq_proxy.url + f"api/kernels/{kernel_id}/execute", json={"code": "1 / 0"}
            ) as resp:
                assert resp.status == 202
                state = resp.headers["Location"]
            for _ in range(100):  # the server-side execution ends (in an error)
                async with http.get(zmq_proxy.url + state.lstrip("/")) as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert zmq_proxy.writer.flush(10)
            async with http.get(url) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                found = samples(await resp.text())
        finally:
            await client.close()
    async with aiohttp.ClientSession() as anonymous, anonymous.get(url) as resp:
        assert resp.status == 403  # as jupyter-server's own /metrics

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    assert value("replay_proxy_messages_relayed_total", channel="shell", direction="to_kernel") >= 4
    iopub = value("replay_proxy_messages_relayed_total", channel="iopub", direction="from_kernel")
    assert iopub >= 3 * 4  # busy, execute_input, stream, idle per execution
    relayed = sum(v for (name, _), v in found.items() if name.startswith("replay_proxy_messages"))
    assert iopub < value("replay_proxy_log_rows_written_total") <= relayed  # (flushed before)
    assert value("replay_proxy_log_ok") == 1
    assert value("replay_proxy_log_rows_set_aside_total") == 0
    assert value("replay_proxy_database_errors_total") == 0
    assert value("replay_proxy_kernels", link="zmq") >= 1
    assert value("replay_proxy_clients") == 1 and value("replay_proxy_clients_behind") == 0
    assert value("replay_proxy_spool_bytes") == 0
    assert value("replay_proxy_spools_in_memory") == 0
    assert value("replay_proxy_spool_dropped_total") == 0
    assert value("replay_proxy_server_executions_total", outcome="error") == 1
    assert value("replay_proxy_server_executions_total", outcome="ok") == 0
    assert value("replay_proxy_replays_total", kind="resume") == 0
    assert value("replay_proxy_fold_write_seconds_count") == 0
