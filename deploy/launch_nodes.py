#!/usr/bin/env python3
"""Start (or stop) `moemesh node serve` on a list of hosts over SSH.

    python deploy/launch_nodes.py deploy/cluster.example.json up
    python deploy/launch_nodes.py deploy/cluster.example.json down

Each host needs moemesh installed (the `moemesh` command on its PATH, or `command` in the file)
and SSH key access. Nodes run under nohup with their log in ~/moemesh-node.log.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys


def ssh(host: str, user: str | None, command: str) -> subprocess.CompletedProcess:
    target = f"{user}@{host}" if user else host
    return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", target, command],
                          capture_output=True, text=True, timeout=60)


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[2] not in ("up", "down"):
        sys.exit(__doc__)
    cluster = json.load(open(sys.argv[1]))
    failed = 0
    for node in cluster["nodes"]:
        cmd = node.get("command", "moemesh")
        if sys.argv[2] == "up":
            args = ["node", "serve", "--port", str(node.get("port", 7070)), "--name", node["name"]]
            if "max_memory" in node:
                args += ["--max-memory", node["max_memory"]]
            remote = f"nohup {cmd} {shlex.join(args)} >> ~/moemesh-node.log 2>&1 < /dev/null &"
        else:
            remote = "pkill -TERM -f 'moemesh node serve' || true"
        r = ssh(node["host"], node.get("user"), remote)
        ok = r.returncode == 0
        failed += not ok
        print(f"{node['name']:<12} {node['host']:<18} {'ok' if ok else 'FAILED: ' + r.stderr.strip()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
