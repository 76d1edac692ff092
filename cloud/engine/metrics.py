"""The engine's Prometheus metrics, in a registry of its own (several servers may share a process in tests).

Exposed by `coexit serve --metrics-port P` at http://HOST:P/metrics:
  coexit_sessions                       open sessions (attached or detached)
  coexit_kv_blocks_used / _free         KV pool blocks
  coexit_tick_rows                      histogram: rows computed per tick (new rows, without catch-up)
  coexit_tick_sessions                  histogram: sessions per tick (the batch size)
  coexit_tick_seconds                   histogram: one tick's compute time (the engine's step time)
  coexit_queue_wait_seconds             histogram: from an Append's arrival to the tick that starts it
  coexit_tokens_total                   tokens produced (rate() gives tokens/s)
  coexit_rows_total                     rows computed
  coexit_ticks_over_budget_total        ticks with more sessions ready than --rows-per-tick (they took turns)
  coexit_decode_rows_deferred_total     decode rows left for a later tick for want of rows (prompts took them)
"""

from __future__ import annotations

import threading
from bisect import bisect_left

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from coexit.errors import UsageError

_TIME_BUCKETS = (.0002, .0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions = Gauge("coexit_sessions", "open sessions (attached or detached)", registry=r)
        self.blocks_used = Gauge("coexit_kv_blocks_used", "KV pool blocks in use", registry=r)
        self.blocks_free = Gauge("coexit_kv_blocks_free", "KV pool blocks free", registry=r)
        self.tick_rows = Histogram("coexit_tick_rows", "rows per tick", buckets=_COUNT_BUCKETS, registry=r)
        self.tick_sessions = Histogram("coexit_tick_sessions", "sessions per tick (batch size)",
                                       buckets=_COUNT_BUCKETS, registry=r)
        self.tick_seconds = Histogram("coexit_tick_seconds", "compute time of one tick", buckets=_TIME_BUCKETS,
                                      registry=r)
        self.queue_wait = BulkHistogram("coexit_queue_wait_seconds", "Append arrival to its first tick",
                                        _TIME_BUCKETS, r)
        self.tokens = Counter("coexit_tokens", "tokens produced", registry=r)
        self.rows = Counter("coexit_rows", "rows computed", registry=r)
        self.over_budget = Counter("coexit_ticks_over_budget", "ticks with more sessions ready than --rows-per-tick "
                                   "(they took turns)", registry=r)
        self.deferred_decode = Counter("coexit_decode_rows_deferred", "decode rows left for a later tick for want "
                                       "of rows (prompts took them)", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                             f"another port") from None
        return server.server_port


class BulkHistogram(Collector):
    """A Prometheus histogram observed a whole array at a time: a steady tick observes one queue wait per session,
    which prometheus_client's Histogram takes one locked call per bucket for. Counts are kept in a numpy array and
    read when scraped; the exposition is the same as a Histogram's (`_bucket{le=...}`, `_count`, `_sum`)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.array([*buckets, np.inf])  # a value lands in the first bucket whose bound >= it
        self._bounds = self.bounds.tolist()
        self.counts = np.zeros(len(self.bounds), dtype=np.int64)
        self.sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.bounds))
        total = float(np.sum(values))
        with self._lock:
            self.counts += counts
            self.sum += total

    def observe(self, value: float) -> None:
        """One value (a general-path Append's wait): its bucket by bisection, without numpy's per-call costs."""
        i = bisect_left(self._bounds, value)
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def collect(self):
        with self._lock:
            cumulative, total = np.cumsum(self.counts).tolist(), self.sum
        bounds = [str(float(b)) if np.isfinite(b) else "+Inf" for b in self.bounds]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=list(zip(bounds, cumulative)),
                                    sum_value=total)
