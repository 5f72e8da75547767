"""`moemesh pair`: first contact between two devices, authenticated by a short code.

One device listens and shows a code; the other connects and types it. Over a plain TCP
connection they exchange certificates, run SPAKE2 with the code as password and both
certificate fingerprints as identities, and confirm the shared key with an HMAC over both
fingerprints. Only if the codes matched and nobody swapped a certificate do both pin each other.
A wrong code fails on both sides without revealing the code to an eavesdropper.

The listening side keeps listening until its code is used or it times out: a connection that is
not a pairing attempt is dropped, and a wrong guess burns the code (a new one is shown), so each
shown code can be guessed once, one chance in a million.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
import time

import msgpack

from .identity import Identity, TrustStore, fingerprint

MAGIC = b"moemesh-pair-v1"
MAX_FRAME = 64 * 1024
TIMEOUT_S = 120
STEP_TIMEOUT_S = 15  # one connection's exchange: a silent peer cannot hold the listener longer


class PairingError(RuntimeError):
    pass


class CodeTried(PairingError):
    """The other side committed a guess of the code and it did not confirm: the code is spent."""


def new_code() -> str:
    return f"{secrets.randbelow(10**6):06d}"


def _send(sock: socket.socket, obj) -> None:
    data = msgpack.packb(obj)
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv(sock: socket.socket):
    head = _recv_exact(sock, 4)
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise PairingError(f"pairing message of {n} bytes is too large")
    return msgpack.unpackb(_recv_exact(sock, n))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PairingError("the other device closed the connection")
        buf += chunk
    return buf


def _exchange(sock: socket.socket, me: Identity, trust: TrustStore, code: str, name: str, role: str,
              side: str) -> dict:
    from spake2 import SPAKE2_A, SPAKE2_B

    _send(sock, {"magic": MAGIC, "cert": me.cert_pem, "name": name, "role": role})
    try:
        hello = _recv(sock)
        if not isinstance(hello, dict) or hello.get("magic") != MAGIC:
            raise PairingError("the other side does not speak the moemesh pairing protocol")
        peer_cert = bytes(hello["cert"])
        fp_me, fp_peer = me.fingerprint.encode(), fingerprint(peer_cert).encode()
        fp_a, fp_b = (fp_me, fp_peer) if side == "A" else (fp_peer, fp_me)
        pake = (SPAKE2_A if side == "A" else SPAKE2_B)(code.encode(), idA=fp_a, idB=fp_b)
        _send(sock, {"pake": pake.start()})
        their_pake = bytes(_recv(sock)["pake"])
    except (KeyError, TypeError, ValueError) as e:  # msgpack's decode errors are ValueErrors
        raise PairingError(f"malformed pairing message ({type(e).__name__})") from None
    # From here the other side's guess of the code is committed: any failure spends the code.
    try:
        key = pake.finish(their_pake)
        transcript = fp_a + b"|" + fp_b
        mine = hmac.new(key, b"confirm-" + side.encode() + transcript, hashlib.sha256).digest()
        _send(sock, {"confirm": mine})
        theirs = bytes(_recv(sock)["confirm"])
    except (PairingError, OSError, KeyError, TypeError, ValueError) as e:
        raise CodeTried(f"pairing failed after the code was tried ({e})") from None
    other = "B" if side == "A" else "A"
    if not hmac.compare_digest(theirs, hmac.new(key, b"confirm-" + other.encode() + transcript, hashlib.sha256).digest()):
        raise CodeTried("pairing failed: the codes do not match (or someone is in the middle)")
    trust.add(peer_cert, str(hello.get("name", "?")), str(hello.get("role", "?")))
    return {"name": hello.get("name"), "role": hello.get("role"), "fingerprint": fp_peer.decode()}


def pair_listen(me: Identity, trust: TrustStore, host: str, port: int, code: str, name: str, role: str,
                on_ready=None, on_new_code=None, timeout: float = TIMEOUT_S) -> dict:
    """Wait for a device to pair with `code` until `timeout`. Connections that are not pairing
    attempts are dropped; after a wrong guess on_new_code(code, why) gets a fresh code."""
    deadline = time.monotonic() + timeout
    with socket.create_server((host, port)) as srv:
        if on_ready:
            on_ready(srv.getsockname()[1])
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PairingError(f"no device paired within {timeout:.0f} s")
            srv.settimeout(left)
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                raise PairingError(f"no device paired within {timeout:.0f} s") from None
            with conn:
                conn.settimeout(min(STEP_TIMEOUT_S, left))
                try:
                    return _exchange(conn, me, trust, code, name, role, "B")
                except CodeTried as e:
                    code = new_code()
                    if on_new_code:
                        on_new_code(code, str(e))
                except (PairingError, OSError):
                    continue  # not a pairing attempt (a port scan, a closed connection): keep listening


def pair_connect(me: Identity, trust: TrustStore, address: str, code: str, name: str, role: str) -> dict:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        return _exchange(sock, me, trust, code, name, role, "A")
