"""An mTLS channel to a medfl coordinator from an identity bundle.

    import medfl
    ch = medfl.channel("consortium/admin")          # a bundle directory or its profile.toml
    for s in medfl.admin(ch).ListStudies(medfl.v1.medfl_pb2.Empty()).studies:
        print(s.id, s.name, s.state)

gRPC core (which grpcio uses, on BoringSSL) offers no Ed25519 signature scheme in
TLS, so only P-256 bundles (the default of ``medfl pki init``) connect from Python;
an Ed25519 bundle fails its handshake with ``no suitable signature algorithm``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Optional, Union
from urllib.parse import urlparse

import grpc

from medfl.v1 import medfl_pb2_grpc

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10 read the profile with tomli
    import tomli as tomllib

PROFILE_FILE = "profile.toml"


@dataclasses.dataclass(frozen=True)
class Profile:
    """A loaded identity bundle: who, where the coordinator is, and the PEM files."""

    role: str
    name: str
    coordinator: str
    server_name: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    directory: pathlib.Path

    @property
    def identity(self) -> str:
        return f"{self.role}/{self.name}"


def load_profile(path: Union[str, pathlib.Path]) -> Profile:
    """Reads a ``profile.toml`` (or the directory holding one) and its PEM files.

    Relative paths in the profile are relative to its own directory, as the Rust
    tools read them.
    """
    path = pathlib.Path(path)
    file = path / PROFILE_FILE if path.is_dir() else path
    with open(file, "rb") as f:
        data = tomllib.load(f)
    missing = [k for k in ("role", "name", "coordinator", "server_name", "cert", "key", "ca") if k not in data]
    if missing:
        raise ValueError(f"{file}: not a medfl profile (missing {', '.join(missing)})")
    directory = file.parent

    def read(key: str) -> bytes:
        return (directory / data[key]).read_bytes()

    return Profile(
        role=data["role"],
        name=data["name"],
        coordinator=data["coordinator"],
        server_name=data["server_name"],
        cert_pem=read("cert"),
        key_pem=read("key"),
        ca_pem=read("ca"),
        directory=directory,
    )


def _target(coordinator: str) -> str:
    url = urlparse(coordinator)
    if url.scheme != "https" or not url.hostname:
        raise ValueError(f"coordinator {coordinator!r}: expected https://HOST:PORT")
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return f"{host}:{url.port or 443}"


def channel(profile: Union[Profile, str, pathlib.Path], coordinator: Optional[str] = None) -> grpc.Channel:
    """An mTLS channel to the profile's coordinator (or ``coordinator``, a URL).

    The coordinator's certificate is checked against the consortium CA of the bundle
    and the profile's ``server_name``; the bundle's certificate and key identify the
    caller.
    """
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=profile.ca_pem,
        private_key=profile.key_pem,
        certificate_chain=profile.cert_pem,
    )
    options = [
        ("grpc.ssl_target_name_override", profile.server_name),
        ("grpc.default_authority", profile.server_name),
        # Models and logs stream in chunks of up to a few MiB.
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    return grpc.secure_channel(_target(coordinator or profile.coordinator), credentials, options=options)


def admin(ch: grpc.Channel) -> medfl_pb2_grpc.AdminStub:
    """The Admin service: studies, sites, invitations (admins only)."""
    return medfl_pb2_grpc.AdminStub(ch)


def audit(ch: grpc.Channel) -> medfl_pb2_grpc.AuditStub:
    """The Audit service: studies, ledgers, the audit log (auditors and admins)."""
    return medfl_pb2_grpc.AuditStub(ch)


def health_check(ch: grpc.Channel, timeout: float = 10.0) -> bool:
    """``grpc.health.v1.Health/Check`` for the whole server: True when SERVING.

    The request is empty and the reply is one enum field, so no generated health
    stubs are needed: SERVING (1) encodes as the two bytes ``08 01``.
    """
    check = ch.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda _: b"",
        response_deserializer=lambda raw: raw,
    )
    return check(None, timeout=timeout) == b"\x08\x01"
