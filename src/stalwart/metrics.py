"""What checkpointing cost this process, as figures for the tools people already watch.

Every event ``runtime.events.record`` notes (inside a task or not) is also tallied here, in memory: how
many of each kind, the sums of their numeric fields, and the newest one's fields. From that tally:

- ``Figures.new()`` gives what changed since it was last asked, under names such as
  ``stalwart/save_blocked_ms``: the Lightning callback and the Hugging Face mirror callback put them in
  the trainer's log (``FlashCheckpointCallback(log_metrics=...)``, ``CheckpointMirrorCallback``);
- ``serve_prometheus(port)`` exports the totals on ``http://addr:port/metrics`` for Prometheus to
  scrape (the ``prometheus`` extra), or set ``STALWART_PROMETHEUS_PORT`` for any FlashCheckpointer to
  do so (the port plus ``LOCAL_RANK``, so ranks on one node do not collide).

Nothing here imports torch, and tallying is a dict update under a lock: no cost the loop would notice.
"""

from __future__ import annotations

import threading
from typing import Any

from . import config

__all__ = ["Figures", "Tally", "serve_prometheus", "stop_prometheus", "tally"]


class Tally:
    """Counts, sums of numeric fields, and the newest fields, per event kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.sums: dict[tuple[str, str], float] = {}
        self.newest: dict[str, dict[str, Any]] = {}
        self.by_source: dict[str, int] = {}  # restores, by the tier they came from

    def add(self, kind: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            for name, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.sums[kind, name] = self.sums.get((kind, name), 0.0) + value
            self.newest[kind] = fields
            if kind == "flash_restore" and isinstance(fields.get("source"), str):
                self.by_source[fields["source"]] = self.by_source.get(fields["source"], 0) + 1

    def reached(self, step: int) -> None:
        """The newest step the loop reached (every step: one assignment, no lock)."""
        self.newest["progress"] = {"step": step}

    def snapshot(self) -> tuple[dict, dict, dict, dict]:
        """Copies of (counts, sums, newest fields, restores by source), consistent with each other."""
        with self._lock:
            return dict(self.counts), dict(self.sums), dict(self.newest), dict(self.by_source)


tally = Tally()  # this process's; ``runtime.events.record`` adds to it


# The newest event of a kind, as log entries: (name, field, scale). Numbers only: loggers plot them.
_LOGGED = {
    "flash_save": (("save_blocked_ms", "blocked", 1000.0), ("save_mb", "bytes", 1 / 2**20)),
    "flash_restore": (
        ("restore_ms", "seconds", 1000.0),
        ("restore_step", "step", 1),
        ("steps_lost", "lost", 1),
    ),
    "preempted": (("preempted_step", "step", 1), ("preemption_save_ms", "seconds", 1000.0)),
    "durable_upload": (("durable_upload_ms", "seconds", 1000.0),),
    "checkpoint_save": (("checkpoint_save_ms", "seconds", 1000.0),),
    "checkpoint_restore": (("checkpoint_restore_ms", "seconds", 1000.0),),
}
RESTORE_SOURCES = ("flash", "peer", "durable")  # ``stalwart/restore_source`` logs the index of one


class Figures:
    """The figures of events that came since the last ``new()``, for one consumer (one trainer's log)."""

    def __init__(self, prefix: str = "stalwart/", source: Tally | None = None) -> None:
        self.prefix = prefix
        self.source = source if source is not None else tally
        self._seen: dict[str, int] = {}

    def new(self) -> dict[str, float]:
        """``{prefix + name: value}`` from the newest event of each kind that happened since the last
        call; a restore adds ``restore_source`` (0 flash, 1 peer, 2 durable: loggers plot numbers)."""
        counts, _, newest, _ = self.source.snapshot()
        out: dict[str, float] = {}
        for kind, entries in _LOGGED.items():
            count = counts.get(kind, 0)
            if count == self._seen.get(kind, 0):
                continue
            self._seen[kind] = count
            fields = newest[kind]
            for name, field, scale in entries:
                value = fields.get(field)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[self.prefix + name] = round(value * scale, 3) if scale != 1 else value
            if kind == "flash_restore" and fields.get("source") in RESTORE_SOURCES:
                out[self.prefix + "restore_source"] = RESTORE_SOURCES.index(fields["source"])
        return out


# Prometheus counters: (name, help, event kind, summed field or None for the count of events).
_COUNTERS = (
    ("flash_saves", "Flash saves committed by this process", "flash_save", None),
    ("flash_save_blocked_seconds", "Time training waited in flash saves", "flash_save", "blocked"),
    ("flash_save_bytes", "Bytes saved to the flash tier", "flash_save", "bytes"),
    ("flash_restore_seconds", "Time spent in flash restores", "flash_restore", "seconds"),
    ("steps_lost", "Steps recomputed after restores (on rank 0)", "flash_restore", "lost"),
    ("durable_uploads", "Steps copied to the durable store", "durable_upload", None),
    ("durable_upload_failures", "Durable copies that failed", "durable_failed", None),
    ("preemptions", "Preemption notices acted on", "preempted", None),
)


def _collector(source: Tally) -> Any:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        """Reads the tally when scraped: nothing is kept twice."""

        def collect(self) -> Any:
            counts, sums, newest, by_source = source.snapshot()
            for name, doc, kind, field in _COUNTERS:
                value = counts.get(kind, 0) if field is None else sums.get((kind, field), 0.0)
                yield CounterMetricFamily(f"stalwart_{name}", doc, value=value)
            restores = CounterMetricFamily(
                "stalwart_flash_restores", "Flash restores, by the tier they came from", labels=["source"]
            )
            for tier, count in sorted(by_source.items()):
                restores.add_metric([tier], count)
            yield restores
            for name, doc, kind, field in (
                (
                    "last_save_blocked_seconds",
                    "The newest flash save's blocked time",
                    "flash_save",
                    "blocked",
                ),
                ("step", "The newest step this process reached", "progress", "step"),
            ):
                gauge = GaugeMetricFamily(f"stalwart_{name}", doc)
                value = newest.get(kind, {}).get(field)
                if isinstance(value, (int, float)):
                    gauge.add_metric([], value)
                yield gauge

    return Collector()


_served: dict[tuple[str, int], tuple[Any, int]] = {}  # (addr, port asked or bound) -> (server, bound port)
_serve_lock = threading.Lock()


def serve_prometheus(port: int, addr: str = "127.0.0.1") -> int:
    """Export this process's checkpoint figures on ``http://addr:port/metrics`` (a daemon thread), and
    return the port (``port=0`` picks a free one). Serving the same address twice is a no-op. Bind
    ``addr='0.0.0.0'`` for a scraper on another machine. Needs ``pip install 'stalwart[prometheus]'``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} is not accepted; use an int in 0..65535 (0: any free port)")
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"addr={addr!r} is not accepted; use an address to bind, e.g. '127.0.0.1'")
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ImportError(
            "serve_prometheus needs prometheus-client: pip install 'stalwart[prometheus]'"
        ) from None
    with _serve_lock:
        if (addr, port) in _served:
            return _served[addr, port][1]
        registry = CollectorRegistry()
        registry.register(_collector(tally))
        server, _thread = start_http_server(port, addr=addr, registry=registry)
        bound = int(server.server_address[1])
        _served[addr, port] = _served[addr, bound] = (server, bound)
        return bound


def stop_prometheus() -> None:
    """Stop every endpoint ``serve_prometheus`` started in this process."""
    with _serve_lock:
        servers = {id(server): server for server, _ in _served.values()}
        _served.clear()
    for server in servers.values():
        server.shutdown()
        server.server_close()


def serve_from_env() -> int | None:
    """Serve on ``STALWART_PROMETHEUS_PORT`` plus ``LOCAL_RANK`` when it is set (the FlashCheckpointer
    calls this, so a task turns metrics on with an environment variable alone)."""
    endpoint = config.prometheus_endpoint()
    return None if endpoint is None else serve_prometheus(*endpoint)
