"""Finding expert nodes: mDNS browsing for `_moemesh._tcp.local.` or a static `host:port` list.

Discovery only proposes addresses; whether a node is usable is decided by the gRPC handshake.
Anyone on the LAN can advertise, copying a real node's TXT id and fingerprint: so every advert
and every address it lists is kept as a candidate (none displaces another), and the coordinator
keys nodes by what the mutually authenticated handshake proves.
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
           on_event=None, verify=None) -> list[NodeAddress]:
    """Nodes answering on mDNS within `timeout` seconds (returns early once `expect` are found).

    on_event(kind, node), if given, sees every "added" and "removed" (a goodbye) as it happens.
    verify(address) -> node id or None, if given, is asked of every advertised address as it
    arrives (a handshake): only the addresses it vouches for are returned, under the id it
    proved, and only those count towards `expect` (a rogue advert then cannot end the wait).
    """
    from zeroconf import ServiceBrowser, ServiceListener

    found: dict[str, list[NodeAddress]] = {}  # mDNS instance name -> a candidate per advertised address
    lock, enough = threading.Lock(), threading.Event()
    zc = zeroconf_for(interface)

    def distinct_ids() -> int:
        return len({a.node_id for addrs in found.values() for a in addrs})

    class Listener(ServiceListener):
        def add_service(self, zc_, type_, name):
            info = zc_.get_service_info(type_, name, timeout=2000)
            if info is None or not info.parsed_addresses():
                return
            props = {k.decode(): (v.decode() if v else "") for k, v in info.properties.items()}
            addrs = [NodeAddress(f"{ip}:{info.port}", props.get("id", name), props) for ip in info.parsed_addresses()]
            if verify is not None:
                proven = [(a, verify(a.address)) for a in addrs]
                addrs = [NodeAddress(a.address, node_id, a.properties) for a, node_id in proven if node_id]
                if not addrs:
                    return
            with lock:
                new = name not in found
                found[name] = addrs
                if expect and distinct_ids() >= expect:
                    enough.set()
            if new and on_event:
                on_event("added", addrs[0])

        update_service = add_service

        def remove_service(self, zc_, type_, name):
            # Reported, but never used to judge liveness: that is the gRPC connection's business.
            with lock:
                addrs = found.pop(name, None)
            if addrs and on_event:
                on_event("removed", addrs[0])

    browser = ServiceBrowser(zc, SERVICE_TYPE, Listener())
    try:
        deadline = time.monotonic() + timeout
        enough.wait(timeout) if expect else time.sleep(timeout)
        while expect and distinct_ids() < expect and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        browser.cancel()
        zc.close()
    return sorted((a for addrs in found.values() for a in addrs), key=lambda a: (a.node_id, a.address))
