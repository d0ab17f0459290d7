"""Reading this process's Prometheus metrics in tests (prometheus-client's global registry, the one ``/metrics``
serves).

The registry is one per process and every test shares it, so tests compare values before and after what they drive
(``Snapshot.moved``), never absolute values of counters.
"""

from __future__ import annotations

from prometheus_client import REGISTRY


def value(name: str, **labels: str) -> float:
    """A sample's value, 0 when the series does not exist (yet). ``name`` as exposed: ``..._total``, ``..._count``."""
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


def exists(name: str, **labels: str) -> bool:
    return REGISTRY.get_sample_value(name, labels) is not None


class Snapshot:
    """Every sample of the registry now; ``moved`` is how much one changed since."""

    def __init__(self) -> None:
        self.before = {(sample.name, frozenset(sample.labels.items())): sample.value
                       for metric in REGISTRY.collect() for sample in metric.samples}

    def moved(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self.before.get((name, frozenset(labels.items())), 0.0)
