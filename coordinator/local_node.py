"""An expert node on this machine in a subprocess, for the demo, the benchmarks and the tests:
the one place that knows how to start `moemesh node serve` and read the line it announces itself
with. Always on port 0 (any free port) with its own cache folder (its identity lives there)."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ANNOUNCEMENT = re.compile(r"\(id (\w+)\) listening on port (\d+)")


class LocalNode:
    """args: more `node serve` flags (--no-mdns, --host, --name, ...); netns: run inside that
    network namespace; env: the process environment; log: a file for its stderr (default: ours);
    cwd: where it runs (default: a temporary folder, so no source tree shadows the package)."""

    def __init__(self, cache_dir, *args: str, netns: str | None = None, env: dict | None = None,
                 log: Path | None = None, cwd=None):
        cmd = [sys.executable, "-m", "coordinator.cli", "node", "serve", "--port", "0", "--cache-dir", str(cache_dir),
               *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        err = open(log, "w") if log else None
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                         cwd=cwd or tempfile.gettempdir())
        finally:
            if err:
                err.close()
        line = self.proc.stdout.readline()
        m = ANNOUNCEMENT.search(line)
        if not m:
            self.stop(signal.SIGKILL)
            detail = Path(log).read_text() if log else ""
            raise RuntimeError(f"expert node did not start: {line!r} {detail}".rstrip())
        self.node_id, self.port = m.group(1), int(m.group(2))
        self.address = f"127.0.0.1:{self.port}"

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
