"""Device identity and trust: a key pair with a self-signed certificate per device, the set of
peers it has paired with (pinned by certificate fingerprint), and the mutual-TLS credentials
built from both.

A device always trusts itself, so a coordinator and nodes on one machine sharing an identity
directory work without pairing. mDNS adverts carry only the certificate fingerprint.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from .paths import cache_root

TARGET_NAME = "moemesh"  # every certificate's DNS name; TLS checks it, trust comes from pinning
INSECURE_WARNING = ("WARNING: --insecure: plaintext gRPC with no authentication. Anyone on this network can "
                    "send requests and read activations (which reveal the prompt). Use only in a lab.")


def default_identity_dir() -> Path:
    return cache_root() / "identity"


def fingerprint(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _new_certificate(name: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    # A unique subject: TLS looks trust anchors up by subject name, so two devices both called
    # "raspberrypi" must not share one.
    unique = f"{name}-{secrets.token_hex(4)}"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, unique),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moemesh")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TARGET_NAME)]), critical=False)
            # Self-signed and pinned: the certificate is its own trust anchor.
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Identity:
    key_pem: bytes
    cert_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    @classmethod
    def load_or_create(cls, folder: Path | None = None, name: str = "moemesh-device") -> "Identity":
        folder = Path(folder or default_identity_dir())
        key, cert = folder / "key.pem", folder / "cert.pem"
        if not (key.exists() and cert.exists()):
            folder.mkdir(parents=True, exist_ok=True)
            key_pem, cert_pem = _new_certificate(name)
            fd = os.open(key.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem)
            cert.write_bytes(cert_pem)
            key.with_suffix(".tmp").replace(key)
        return cls(key.read_bytes(), cert.read_bytes())


class TrustStore:
    """peers.json beside the identity: fingerprint -> {name, role, cert}. Re-read when it changes,
    so a running node trusts a peer paired after it started."""

    def __init__(self, folder: Path | None = None):
        self.path = Path(folder or default_identity_dir()) / "peers.json"
        self._lock = threading.Lock()

    def peers(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def add(self, cert_pem: bytes, name: str, role: str) -> str:
        fp = fingerprint(cert_pem)
        with self._lock:
            peers = self.peers()
            peers[fp] = {"name": name, "role": role, "cert": cert_pem.decode()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(peers, indent=1))
            tmp.replace(self.path)
        return fp

    def mtime(self) -> float:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def roots(self, me: Identity) -> bytes:
        """PEM bundle of every pinned certificate, ourselves included."""
        return b"".join([me.cert_pem] + [p["cert"].encode() for p in self.peers().values()])

    def trusts(self, fp: str, me: Identity) -> bool:
        return fp == me.fingerprint or fp in self.peers()


def server_credentials(me: Identity, trust: TrustStore) -> grpc.ServerCredentials:
    """Mutual TLS; clients must present a pinned certificate. Re-reads the trust store on change."""
    state = {"mtime": trust.mtime()}

    def config():
        return grpc.ssl_server_certificate_configuration([(me.key_pem, me.cert_pem)], root_certificates=trust.roots(me))

    def fetch():
        m = trust.mtime()
        if m == state["mtime"]:
            return None
        state["mtime"] = m
        return config()

    return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=True)


def channel_credentials(me: Identity, trust: TrustStore) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=trust.roots(me), private_key=me.key_pem,
                                        certificate_chain=me.cert_pem)


CHANNEL_TLS_OPTIONS = [("grpc.ssl_target_name_override", TARGET_NAME)]
