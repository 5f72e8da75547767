"""The plan `moemesh cluster up` saves (which node serves which experts of which model) and the
checks `cluster status` makes against the live nodes.
"""
from __future__ import annotations

import json
from pathlib import Path

from expert_node.paths import cache_root

from ..placement import Placement
from .connect import ClusterReport
from .node_client import ClusterError

def default_plan_path() -> Path:
    return cache_root() / "cluster.json"


def save_plan(path: Path, model_folder: str, reports: list[ClusterReport], placement: Placement) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": str(Path(model_folder).resolve()),
                                "nodes": {r.node_id: r.address for r in reports},
                                "placement": placement.to_dict()}, indent=1))


def load_plan(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_text())
        plan["placement"] = Placement.from_dict(plan["placement"])
        return plan
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(f"{path}: not a usable cluster plan ({e}); run `moemesh cluster up` again") from None


def plan_problems(plan: dict, rows: list[dict]) -> list[str]:
    """Why a saved plan cannot run as saved, given each planned node's `node_status` row (in the
    plan's order): a node down, answering under another id, or not holding its share."""
    problems = []
    for (node_id, address), row in zip(plan["nodes"].items(), rows):
        if not row["up"]:
            problems.append(f"node {node_id} at {address} does not answer ({row['error']})")
            continue
        if row["node_id"] != node_id:
            problems.append(f"{address} answers as node {row['node_id']}, the plan names {node_id} there")
            continue
        want = set(plan["placement"].pieces_of(node_id))
        held = {(int(l), e) for l, es in row["layers"].items() for e in es}
        if want - held:
            problems.append(f"node {node_id} at {address} holds {len(want & held)} of its {len(want)} experts")
    return problems
