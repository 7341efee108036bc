"""`kimi-cluster certs`: a private certificate authority and a certificate per node, for mutual TLS between
the head and its expert workers.

Every node's certificate names the node (as a DNS name) and its address, and serves both ends: workers
present it to the head, and the head presents its own to the workers, which accept only clients whose
certificate this CA signed. Private keys are written readable by their owner only. Running the command
again for new nodes reuses the CA, so the certificates already handed out stay valid.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster.config import NODE_PLACEHOLDER

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
NODE_CERT, NODE_KEY = f"{NODE_PLACEHOLDER}.pem", f"{NODE_PLACEHOLDER}-key.pem"  # the config's tls paths
VALID_DAYS = 3650
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class NodeAddress:
    name: str
    address: str  # an IP address or a host name


def parse_nodes(text: str) -> list[NodeAddress]:
    """NAME=ADDRESS,NAME=ADDRESS,... as the command line gives them."""
    nodes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, address = item.partition("=")
        if not equals or not address:
            raise ValueError(f"--nodes: {item!r} is not NAME=ADDRESS (e.g. bigbox=192.168.1.10)")
        if not NODE_NAME.fullmatch(name):
            raise ValueError(f"--nodes: node name {name!r} must be letters, digits, '.', '_' or '-' (it names files)")
        nodes.append(NodeAddress(name, address))
    if not nodes:
        raise ValueError("--nodes: give at least one NAME=ADDRESS")
    if len({n.name for n in nodes}) != len(nodes):
        raise ValueError("--nodes: each node name once")
    return nodes


def write_certificates(folder: Path, nodes: list[NodeAddress]) -> list[Path]:
    """The CA (made unless the folder has one) and each node's certificate and key; returns the files written."""
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    ca_cert_path, ca_key_path = folder / CA_CERT, folder / CA_KEY
    written = []
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _certificate(_name("kimi-cluster CA"), ca_key.public_key(), _name("kimi-cluster CA"), ca_key,
                               is_ca=True)
        written += [_write(ca_key_path, _key_bytes(ca_key), private=True),
                    _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))]
    for node in nodes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(_name(node.name), key.public_key(), ca_cert.subject, ca_key, is_ca=False,
                            alternative_names=_alternative_names(node))
        written += [_write(folder / NODE_KEY.replace(NODE_PLACEHOLDER, node.name), _key_bytes(key), private=True),
                    _write(folder / NODE_CERT.replace(NODE_PLACEHOLDER, node.name),
                           cert.public_bytes(serialization.Encoding.PEM))]
    return written


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alternative_names(node: NodeAddress) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(node.name)]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(node.address)))
    except ValueError:
        if node.address != node.name:
            names.append(x509.DNSName(node.address))
    return names


def _certificate(subject: x509.Name, public_key, issuer: x509.Name, issuer_key, is_ca: bool,
                 alternative_names: list[x509.GeneralName] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _key_bytes(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Written whole; a private one is created readable by its owner only (never briefly open to others)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    return path
