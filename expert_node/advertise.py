"""mDNS/DNS-SD advertisement of an expert node (`_moemesh._tcp.local.`) with python-zeroconf.

TXT carries what a coordinator needs to choose nodes before connecting: node id, protocol
version, port, memory offered, cores, ISA. Liveness is never judged from mDNS (records of a
killed node linger); the coordinator uses the gRPC connection and health checks for that.
"""
from __future__ import annotations

import socket

from zeroconf import IPVersion, ServiceInfo, Zeroconf

from .protocol import PROTOCOL_VERSION, SERVICE_TYPE


def zeroconf_for(interface: str | None) -> Zeroconf:
    """All interfaces by default; `interface` (an IP address) restricts mDNS to one."""
    if interface:
        return Zeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)
    return Zeroconf(ip_version=IPVersion.V4Only)


def local_addresses(interface: str | None) -> list[str]:
    if interface:
        return [interface]
    try:
        import ifaddr

        return [ip.ip for a in ifaddr.get_adapters() for ip in a.ips
                if isinstance(ip.ip, str) and not ip.ip.startswith("169.254.")]
    except ImportError:  # pragma: no cover - ifaddr comes with zeroconf
        return [socket.gethostbyname(socket.gethostname())]


class Advertiser:
    def __init__(self, node_id: str, name: str, port: int, properties: dict[str, str], interface: str | None = None):
        self.zc = zeroconf_for(interface)
        props = {"id": node_id, "pv": str(PROTOCOL_VERSION), "port": str(port), **properties}
        self.info = ServiceInfo(
            SERVICE_TYPE, f"{name}-{node_id[:6]}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in local_addresses(interface)],
            port=port, properties=props, server=f"moemesh-{node_id}.local.")

    def start(self) -> None:
        self.zc.register_service(self.info)

    def stop(self) -> None:
        """Withdraw the advertisement (goodbye packets) and close the sockets."""
        try:
            self.zc.unregister_service(self.info)
        finally:
            self.zc.close()
