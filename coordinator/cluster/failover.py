"""Failover and repair for the remote expert backend: a node that fails or misses its deadline is
marked down (its work goes to the next replica within the same layer, in remote.py); in the
background its pieces get new live hosts, pushed and switched to (repair), a node whose stream
ended while idle is found (watch), and a down node that answers again is re-provisioned and put
back in its planned roles (revive).

A mixin of RemoteExpertBackend, whose state it reads and changes under its lock: clients,
placement, planned, provisioner, replicas, deadlines, events, _up, _lock, _repair_lock, _closed,
_node_ids, revive_interval_s, repair_grace_s, node_label(), is_up().
"""
from __future__ import annotations

import sys
import threading
import time

from ..placement import repair_placement, restore_roles
from .node_client import ClusterError, ComputeSession, node_capacity


class Failover:
    def mark_down(self, node: str, why: str) -> None:
        with self._lock:
            if not self._up[node] or self._closed.is_set():  # streams end on close: not a failure
                return
            self._up[node] = False
            self.events.append((time.monotonic(), node, f"down: {why}"))
        print(f"moemesh: {self.node_label(node)} is down ({why}); its experts go to replicas", file=sys.stderr)
        threading.Thread(target=self._revive, args=(node,), daemon=True, name=f"moemesh-revive-{node}").start()
        if self.provisioner is not None:
            threading.Thread(target=self._repair, daemon=True, name=f"moemesh-repair-{node}").start()

    def _repair(self) -> None:
        """Give the pieces of down nodes new live hosts (pushing the weights), then switch routing.
        Waits repair_grace_s first: a node that was only slow is back by then, and nothing is pushed."""
        if self._closed.wait(self.repair_grace_s):
            return
        with self._repair_lock:
            if self._closed.is_set():
                return
            with self._lock:
                down = {n for n, up in self._up.items() if not up}
                live = [n for n, up in self._up.items() if up]
                current = self.placement
            capacities = [node_capacity(n, self.clients[n].info) for n in live]
            repaired = repair_placement(current, capacities, down, self.provisioner.piece_bytes, self.replicas)
            gained = {n: set(repaired.pieces_of(n)) - set(current.pieces_of(n)) for n in live}
            gained = {n: g for n, g in gained.items() if g}
            if not gained:
                return
            try:
                for n in gained:
                    client = self.clients[n]
                    client.handshake(timeout=5.0)
                    self.provisioner.provision(client, repaired.pieces_of(n), new_session=False, progress=False)
            except ClusterError as e:
                print(f"moemesh: placement repair stopped ({e}); the coordinator covers the rest", file=sys.stderr)
                return
            with self._lock:
                self.placement = repaired
                for n, g in gained.items():
                    self.events.append((time.monotonic(), n, f"repaired: {len(g)} pieces"))
            moved = ", ".join(f"{len(g)} to {self.clients[n].info.name}" for n, g in gained.items())
            print(f"moemesh: placement repaired ({moved} pieces)", file=sys.stderr)

    def _watch(self) -> None:
        """A node that restarts or dies while no request is in flight ends its stream unnoticed;
        finding that here keeps a dead replica from being the one a failover turns to."""
        while not self._closed.wait(self.revive_interval_s):
            for node in self._node_ids:
                session = self.clients[node].session
                ended = session.ended if session is not None else None
                if ended is not None and self.is_up(node):
                    self.mark_down(node, str(ended))

    def _revive(self, node: str) -> None:
        """Poll a down node (handshake, health) until it answers, re-provision it, mark it up."""
        client = self.clients[node]
        while not self._closed.wait(self.revive_interval_s):
            try:
                client.handshake(timeout=1.0)
                if self.provisioner is None:
                    client.session.close()
                    client.session = ComputeSession(client.stub, client.address)
                else:
                    self.provisioner.provision(client, self.placement.pieces_of(node))
            except ClusterError:
                continue
            self.deadlines.announce(node, client.info, client.rtt_s)
            with self._lock:
                self._up[node] = True
                # Back to its planned roles: repairs moved it behind the live hosts of its pieces.
                self.placement = restore_roles(self.placement, self.planned)
                self.events.append((time.monotonic(), node, "up"))
            print(f"moemesh: {self.node_label(node)} is back", file=sys.stderr)
            return
