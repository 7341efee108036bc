"""Certificates for TLS tests, made with `cryptography`."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write_certificates(folder: Path, name: str) -> dict[str, str]:
    """A CA, and a certificate it signs for 127.0.0.1: the PEM files a cluster config's `tls` names."""
    def certificate(subject: str, key, issuer: str, issuer_key, is_ca: bool):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        if not is_ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    files = {"ca": certificate(f"{name} CA", ca_key, f"{name} CA", ca_key, True).public_bytes(pem),
             "cert": certificate("127.0.0.1", node_key, f"{name} CA", ca_key, False).public_bytes(pem),
             "key": node_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())}
    for kind, data in files.items():
        (folder / f"{name}-{kind}.pem").write_bytes(data)
    return {kind: str(folder / f"{name}-{kind}.pem") for kind in files}
