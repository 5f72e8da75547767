#!/usr/bin/env python3
"""Start (or stop) `moemesh node serve` on a list of hosts over SSH.

    python deploy/launch_nodes.py deploy/cluster.example.json up
    python deploy/launch_nodes.py deploy/cluster.example.json down

Each host needs moemesh installed (the `moemesh` command on its PATH, or `command` in the file)
and SSH key access; `args` in a node's entry adds `node serve` flags. A node runs under nohup with its log in ~/moemesh-node-NAME.log and its pid
in ~/.moemesh/node-NAME.pid: `up` reports ok only once the node says it is listening (else the
log's last lines), and `down` stops exactly the node it started, never another moemesh node on
the same host (one run by systemd, say).
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

START_TIMEOUT_S = 20


def ssh(host: str, user: str | None, command: str) -> subprocess.CompletedProcess:
    target = f"{user}@{host}" if user else host
    return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", target, command],
                          capture_output=True, text=True, timeout=60)


def files(name: str) -> tuple[str, str]:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return f"$HOME/.moemesh/node-{safe}.pid", f"$HOME/moemesh-node-{safe}.log"


def up_command(node: dict) -> str:
    """Shell run on the host: start the node unless its pid file names a live one, then wait for
    its 'listening' line (exit 1 with the log's tail if it dies or stays silent)."""
    pid, log = files(node["name"])
    args = ["node", "serve", "--port", str(node.get("port", 7070)), "--name", node["name"]]
    if "max_memory" in node:
        args += ["--max-memory", str(node["max_memory"])]
    args += [str(a) for a in node.get("args", [])]  # any other `node serve` flags
    start = f"{node.get('command', 'moemesh')} {shlex.join(args)}"
    return f"""mkdir -p "$HOME/.moemesh"
if [ -f "{pid}" ] && kill -0 "$(cat "{pid}")" 2>/dev/null; then echo "already running (pid $(cat "{pid}"))"; exit 0; fi
from=$(( $([ -f "{log}" ] && wc -c < "{log}" || echo 0) + 1 ))
nohup {start} >> "{log}" 2>&1 < /dev/null &
echo $! > "{pid}"
for _ in $(seq {START_TIMEOUT_S * 5}); do
  if tail -c +$from "{log}" | grep -q "listening on port"; then tail -c +$from "{log}" | grep "listening on port"; exit 0; fi
  if ! kill -0 "$(cat "{pid}")" 2>/dev/null; then echo "the node exited:"; tail -c +$from "{log}" | tail -n 5; rm -f "{pid}"; exit 1; fi
  sleep 0.2
done
echo "no 'listening' line from the node within {START_TIMEOUT_S} s:"; tail -c +$from "{log}" | tail -n 5; exit 1"""


def down_command(node: dict) -> str:
    """Shell run on the host: stop the node whose pid this launcher recorded, and only it."""
    pid, _ = files(node["name"])
    return f"""if [ ! -f "{pid}" ]; then echo "not started by this launcher (no {pid})"; exit 0; fi
p=$(cat "{pid}"); rm -f "{pid}"
kill -TERM "$p" 2>/dev/null || {{ echo "was not running"; exit 0; }}
for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || exit 0; sleep 0.1; done
kill -KILL "$p" 2>/dev/null; exit 0"""


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[2] not in ("up", "down"):
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        cluster = json.load(f)
    failed = 0
    for node in cluster["nodes"]:
        command = up_command(node) if sys.argv[2] == "up" else down_command(node)
        r = ssh(node["host"], node.get("user"), command)
        ok = r.returncode == 0
        failed += not ok
        said = (r.stdout.strip() or r.stderr.strip()).replace("\n", " | ")
        print(f"{node['name']:<12} {node['host']:<18} {'ok' if ok else 'FAILED'}: {said}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
