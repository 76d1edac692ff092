"""The engine's bulk histogram (a whole tick's queue waits in one call) exposes exactly what prometheus_client's own
Histogram does for the same values, one by one, whether they come in bulk or one at a time."""

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from cloud.engine.metrics import _TIME_BUCKETS, EngineMetrics


def exposed(registry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if line.startswith("coexit_queue_wait") and "_created" not in line]


def test_bulk_histogram_exposes_what_one_by_one_observations_would():
    rng = np.random.default_rng(0)
    # values on every bucket bound (a value equal to a bound counts in that bucket), between them, and past the last
    values = np.concatenate([np.array(_TIME_BUCKETS), rng.exponential(0.01, 500), [0.0, 9.5, 1e-9]])
    metrics, reference = EngineMetrics(), CollectorRegistry()
    hist = Histogram("coexit_queue_wait_seconds", "Append arrival to its first tick", buckets=_TIME_BUCKETS,
                     registry=reference)
    metrics.queue_wait.observe_many(values[200:])
    metrics.queue_wait.observe_many(np.zeros(0))
    for v in [*values[:200], *values[-3:]]:  # one at a time too: the bounds and past the last one
        metrics.queue_wait.observe(float(v))
    for v in [*values, *values[-3:]]:
        hist.observe(float(v))
    got, want = exposed(metrics.registry), exposed(reference)
    assert len(want) == len(_TIME_BUCKETS) + 3  # every bucket, +Inf, count, sum
    assert got[:-1] == want[:-1]  # buckets and count, exactly
    assert got[-1].startswith("coexit_queue_wait_seconds_sum ")
    assert abs(float(got[-1].split()[1]) - float(want[-1].split()[1])) < 1e-9  # the sum (summed in another order)
