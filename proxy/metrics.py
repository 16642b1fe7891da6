"""Prometheus metrics of the proxy, at ``/replay-proxy/metrics``.

The components keep plain counts (the relay tap below, the log writer, the spools, the
replayer, the Y fold, the executor); :class:`ProxyCollector` reads them when Prometheus scrapes,
so nothing on the relay's path touches prometheus_client. Each proxy has a registry of its own.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .codecs import Message
from .relay import Requester, Tap

if TYPE_CHECKING:
    from .server import ReplayProxy


class RelayCounts(Tap):
    """Messages relayed, by channel and direction."""

    def __init__(self) -> None:
        self.relayed: collections.Counter[tuple[str, str]] = collections.Counter()

    def message_relayed(
        self,
        seq: int,
        kernel_id: str,
        direction: str,
        message: Message,
        client: Requester | None,
        received_at: float,
    ) -> None:
        self.relayed[(message.channel, direction)] += 1


class LatencyHistogram:
    """Observations in fixed buckets (seconds), for a histogram metric."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, int]]:
        cumulative, found = 0, []
        for bound, count in zip([*map(str, self.BUCKETS), "+Inf"], self.counts, strict=True):
            cumulative += count
            found.append((bound, cumulative))
        return found


class ProxyCollector(Collector):
    """The proxy's figures, read at scrape time."""

    def __init__(self, proxy: ReplayProxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        relayed = CounterMetricFamily(
            "replay_proxy_messages_relayed", "Kernel messages relayed.",
            labels=["channel", "direction"],
        )  # fmt: skip
        for (channel, direction), count in sorted(proxy.counts.relayed.items()):
            relayed.add_metric([channel, direction], count)
        yield relayed

        health = proxy.writer.health()
        yield CounterMetricFamily(
            "replay_proxy_log_rows_written", "Messages committed to the log.", value=health.written
        )
        yield GaugeMetricFamily(
            "replay_proxy_log_pending_rows",
            "Rows waiting for the log writer.",
            value=health.pending,
        )
        yield GaugeMetricFamily(
            "replay_proxy_log_lag_messages",
            "Messages relayed but not yet committed to the log.",
            value=max(0, proxy.writer.last_seq - proxy.writer.durable_seq),
        )
        yield CounterMetricFamily(
            "replay_proxy_log_rows_set_aside",
            "Rows the database refused, kept in its set_aside table.",
            value=health.set_aside,
        )
        yield CounterMetricFamily(
            "replay_proxy_log_rows_dropped",
            "Rows dropped while the database failed for too long.",
            value=health.dropped,
        )
        yield CounterMetricFamily(
            "replay_proxy_database_errors",
            "Failed attempts to write the log (disk full, locked, corrupt).",
            value=proxy.writer.errors,
        )
        yield GaugeMetricFamily(
            "replay_proxy_log_ok", "1 while the log is writable.", value=int(health.ok)
        )

        kernels = GaugeMetricFamily(
            "replay_proxy_kernels", "Kernels followed, by link.", labels=["link"]
        )
        links = collections.Counter(relay.link.kind for relay in proxy.relay.kernels.values())
        for kind in ("zmq", "websocket"):
            kernels.add_metric([kind], links[kind])
        yield kernels
        clients = [c for relay in proxy.relay.kernels.values() for c in relay.clients.values()]
        yield GaugeMetricFamily("replay_proxy_clients", "Clients connected.", value=len(clients))
        yield GaugeMetricFamily(
            "replay_proxy_clients_behind",
            "Clients reading from the log because they fell behind.",
            value=sum(client.behind for client in clients),
        )
        spools = proxy.kernel_spools()
        yield GaugeMetricFamily(
            "replay_proxy_spool_bytes",
            "Kernel output waiting to be relayed (on disk; in memory while the disk is full).",
            value=sum(spool.backlog() for spool in spools),
        )
        yield GaugeMetricFamily(
            "replay_proxy_spools_in_memory",
            "Kernels whose output waits in memory because the disk refused it.",
            value=sum(spool.in_memory for spool in spools),
        )
        yield CounterMetricFamily(
            "replay_proxy_spool_dropped",
            "Kernel messages dropped: the disk was full and too much waited in memory.",
            value=proxy.spools.dropped,
        )

        replayer = proxy.replayer
        replays = CounterMetricFamily(
            "replay_proxy_replays", "Clients sent history before live traffic.", labels=["kind"]
        )
        for kind in ("resume", "history"):
            replays.add_metric([kind], replayer.replays[kind])
        yield replays
        yield CounterMetricFamily(
            "replay_proxy_replayed_messages",
            "Messages sent from the log (replays, and clients catching up).",
            value=replayer.replayed_messages,
        )
        yield CounterMetricFamily(
            "replay_proxy_resent_messages",
            "Messages sent again to a resuming session that had them, unacknowledged.",
            value=replayer.resent_messages,
        )

        folder = proxy.folder
        yield CounterMetricFamily(
            "replay_proxy_handoffs",
            "Executions whose outputs the proxy took over writing when their client left.",
            value=folder.handoffs if folder is not None else 0,
        )
        if folder is not None:
            latency = folder.write_latency
            yield HistogramMetricFamily(
                "replay_proxy_fold_write_seconds",
                "Time to apply kernel output to a notebook's collaborative document.",
                buckets=latency.buckets(),
                sum_value=latency.total,
            )
        executions = CounterMetricFamily(
            "replay_proxy_server_executions",
            "Server-side executions finished, by outcome.",
            labels=["outcome"],
        )
        outcomes = proxy.executor.outcomes if proxy.executor is not None else {}
        for outcome in ("ok", "error", "aborted", "cancelled", "failed"):
            executions.add_metric([outcome], outcomes.get(outcome, 0))
        yield executions


def registry_for(proxy: ReplayProxy) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
