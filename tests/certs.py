"""Throw-away X.509 material for tests, made with `cryptography`: a CA, server certificates and client certificates.

`make_pki(dir, server_ips=...)` writes one CA and everything the planes need signed by
it, plus a second, unrelated CA with a client certificate (the "wrong CA" case).
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # CA certificate of everything below except rogue_client
    controlplane_server: KeyPair  # the public API's certificate
    dataplane_server: KeyPair
    controlplane_client: KeyPair  # the control plane's identity towards the data plane
    rogue_ca: Path
    rogue_client: KeyPair  # a client certificate from rogue_ca


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _validity(x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                        .public_key(key.public_key()).serial_number(x509.random_serial_number()))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    path = directory / f"{name}.pem"
    _write_cert(cert, path)
    return cert, key, path


def issue(directory: Path, name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), server: bool = True, client: bool = False) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _validity(x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
                        .public_key(key.public_key()).serial_number(x509.random_serial_number()))
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    _write_cert(cert, pair.cert)
    _write_key(key, pair.key)
    return pair


def make_pki(directory: Path, server_ips: tuple[str, ...] = ("127.0.0.1",)) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, ca_path = make_ca(directory, "nanoplane-test-ca")
    dns = ("localhost",)
    rogue_cert, rogue_key, rogue_path = make_ca(directory, "rogue-ca")
    return Pki(
        ca=ca_path,
        controlplane_server=issue(directory, "controlplane", ca_cert, ca_key, dns=("controlplane", *dns), ips=server_ips),
        dataplane_server=issue(directory, "dataplane", ca_cert, ca_key, dns=("dataplane", *dns), ips=server_ips),
        controlplane_client=issue(directory, "controlplane-client", ca_cert, ca_key, server=False, client=True),
        rogue_ca=rogue_path,
        rogue_client=issue(directory, "rogue-client", rogue_cert, rogue_key, server=False, client=True),
    )
