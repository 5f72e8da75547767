"""Finding expert nodes: mDNS browsing for `_moemesh._tcp.local.` or a static `host:port` list.

Discovery only proposes addresses; whether a node is usable is decided by the gRPC handshake.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from expert_node.advertise import zeroconf_for
from expert_node.protocol import SERVICE_TYPE


@dataclass(frozen=True)
class NodeAddress:
    address: str  # host:port
    node_id: str = ""
    properties: dict = field(default_factory=dict, compare=False, hash=False)


def parse_static(nodes: list[str]) -> list[NodeAddress]:
    out = []
    for n in nodes:
        host, sep, port = n.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--node {n!r}: expected host:port")
        out.append(NodeAddress(n))
    return out


def browse(timeout: float = 3.0, expect: int | None = None, interface: str | None = None,
           on_event=None) -> list[NodeAddress]:
    """Nodes answering on mDNS within `timeout` seconds (returns early once `expect` are found).

    on_event(kind, node), if given, sees every "added" and "removed" (a goodbye) as it happens.
    """
    from zeroconf import ServiceBrowser, ServiceListener

    found: dict[str, NodeAddress] = {}
    names: dict[str, str] = {}  # mDNS instance name -> node id
    lock, enough = threading.Lock(), threading.Event()
    zc = zeroconf_for(interface)

    class Listener(ServiceListener):
        def add_service(self, zc_, type_, name):
            info = zc_.get_service_info(type_, name, timeout=2000)
            if info is None or not info.parsed_addresses():
                return
            props = {k.decode(): (v.decode() if v else "") for k, v in info.properties.items()}
            addr = NodeAddress(f"{info.parsed_addresses()[0]}:{info.port}", props.get("id", name), props)
            with lock:
                new = addr.node_id not in found
                found[addr.node_id] = addr
                names[name] = addr.node_id
                if expect and len(found) >= expect:
                    enough.set()
            if new and on_event:
                on_event("added", addr)

        update_service = add_service

        def remove_service(self, zc_, type_, name):
            # Reported, but never used to judge liveness: that is the gRPC connection's business.
            with lock:
                node = found.pop(names.pop(name, ""), None)
            if node and on_event:
                on_event("removed", node)

    browser = ServiceBrowser(zc, SERVICE_TYPE, Listener())
    try:
        deadline = time.monotonic() + timeout
        enough.wait(timeout) if expect else time.sleep(timeout)
        while expect and len(found) < expect and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        browser.cancel()
        zc.close()
    return sorted(found.values(), key=lambda a: a.node_id)
