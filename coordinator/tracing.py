"""Built-in tracing: spans of the coordinator's work and of every hop to an expert node, off by
default and nearly free when off, exported as Chrome trace JSON (Perfetto, chrome://tracing).

Nodes time themselves and return their durations in each reply, so no clock synchronisation is
needed: the wire time of a hop is its round trip minus the node's own time, and the node's
spans are drawn centred in the round trip. One trace process per device, one track per stage.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

COORDINATOR = "coordinator"


@dataclass
class Span:
    name: str
    device: str  # trace process: "coordinator" or "node <name>"
    track: str  # trace thread within the device
    start_us: float
    dur_us: float
    args: dict = field(default_factory=dict)


class NullTracer:
    """The default: records nothing."""

    enabled = False

    @contextmanager
    def span(self, name: str, track: str = "model", **args):
        yield

    def add(self, *a, **k) -> None:
        pass

    def now_us(self) -> float:
        return 0.0

    def us(self, t_perf: float) -> float:
        return 0.0


class Tracer(NullTracer):
    enabled = True

    def __init__(self):
        self.t0 = time.perf_counter()
        self.spans: list[Span] = []

    def now_us(self) -> float:
        return self.us(time.perf_counter())

    def us(self, t_perf: float) -> float:
        """A time.perf_counter() reading on this trace's clock (microseconds since it started)."""
        return (t_perf - self.t0) * 1e6

    @contextmanager
    def span(self, name: str, track: str = "model", **args):
        start = self.now_us()
        try:
            yield
        finally:
            self.spans.append(Span(name, COORDINATOR, track, start, self.now_us() - start, args))

    def add(self, name: str, device: str, track: str, start_us: float, dur_us: float, **args) -> None:
        self.spans.append(Span(name, device, track, start_us, dur_us, args))

    def chrome_trace(self) -> dict:
        """{"traceEvents": [...]}: complete events (ph X, microseconds) plus process/thread names."""
        pids = {COORDINATOR: 1}
        tids: dict[tuple[str, str], int] = {}
        events = []
        for s in sorted(self.spans, key=lambda s: (s.start_us, -s.dur_us)):
            pid = pids.setdefault(s.device, len(pids) + 1)
            tid = tids.setdefault((s.device, s.track), len(tids) + 1)
            events.append({"name": s.name, "ph": "X", "pid": pid, "tid": tid, "ts": round(s.start_us, 3),
                           "dur": round(max(s.dur_us, 0.0), 3), "args": s.args})
        meta = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": dev}} for dev, pid in pids.items()]
        meta += [{"name": "thread_name", "ph": "M", "pid": pids[dev], "tid": tid, "args": {"name": track}}
                 for (dev, track), tid in tids.items()]
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def write(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)


NULL_TRACER = NullTracer()
