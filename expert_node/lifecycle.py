"""An expert node's life: start the server, advertise it on mDNS, print the line launchers wait
for, serve until SIGINT or SIGTERM, withdraw the advertisement, stop. The `moemesh node serve`
command is a thin front for it."""
from __future__ import annotations

import asyncio
import signal

from . import server as node_server


def run_node(port: int, name: str | None = None, cache_dir: str | None = None, max_memory: int | None = None,
             model_dir: str | None = None, host: str = "[::]", identity_dir: str | None = None,
             insecure: bool = False, advertise: bool = True, advertise_port: int | None = None,
             interface: str | None = None) -> None:
    """Serve until signalled. advertise_port: the port to announce when a proxy fronts the node."""

    async def run() -> None:
        server, service, bound = await node_server.start(port, name, cache_dir, max_memory, model_dir, host,
                                                         identity_dir, insecure)
        advert = None
        if advertise:
            from . import native
            from .advertise import Advertiser

            advert = Advertiser(service.node_id, service.name, advertise_port or bound,
                                {"mem": str(service.memory_budget()), "cores": str(native.get_threads()),
                                 "isa": native.active_isa(), "fp": service.fingerprint}, interface)
            await asyncio.to_thread(advert.start)
        print(f"moemesh node {service.name} (id {service.node_id}) listening on port {bound}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        if advert:
            await asyncio.to_thread(advert.stop)  # withdraw the advertisement first: nobody should pick a leaving node
        await server.stop(grace=2)
        service.close()

    asyncio.run(run())
