"""`kimi-cluster certs`: a private certificate authority and a certificate per node, for mutual TLS between
the head and its expert workers.

Every node's certificate names the node (as a DNS name) and its address, and serves both ends: workers
present it to the head, and the head presents its own to the workers, which accept only clients whose
certificate this CA signed. Private keys are written readable by their owner only. Running the command
again for new nodes reuses the CA, so the certificates already handed out stay valid.

The folder holds what the nodes need (the CA's certificate, each node's certificate and key) and is copied
to every node. The CA's key, which can make certificates every worker trusts, lives in a folder of its own
beside it (FOLDER-ca), which stays on the machine that makes the certificates.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
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


def ca_key_folder(folder: Path) -> Path:
    """Where the CA's key of the certificates in `folder` is kept: beside it, never inside the copied folder."""
    return folder.with_name(folder.name + "-ca")


def write_certificates(folder: Path, nodes: list[NodeAddress]) -> list[Path]:
    """The CA (made unless one exists) and each node's certificate and key; returns the files written."""
    for private_folder in (folder, ca_key_folder(folder)):
        if not private_folder.exists():
            private_folder.mkdir(mode=0o700, parents=True)
    ca_cert_path, ca_key_path = folder / CA_CERT, ca_key_folder(folder) / CA_KEY
    written = [_move_out(folder / CA_KEY, ca_key_path)] if (folder / CA_KEY).exists() else []
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


def certificate_problem(cert_path: Path, ca_path: Path, names: list[str]) -> str | None:
    """What is wrong with a node's certificate: not signed by the CA, or not naming each of `names` (the head
    checks a worker's address against them); None when nothing is."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_path.read_bytes()))
    except (ValueError, TypeError, InvalidSignature):
        return f"{cert_path} was not signed by the CA in {ca_path}"
    try:
        alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"{cert_path} names no host"
    named = [str(value) for value in alternative.get_values_for_type(x509.DNSName)
             + alternative.get_values_for_type(x509.IPAddress)]
    missing = [name for name in names if name not in named]
    if missing:
        return f"{cert_path} is for {', '.join(named)}, not {', '.join(missing)}"
    return None


def _move_out(old: Path, new: Path) -> Path:
    """An earlier version kept the CA's key among the files copied to every node: move it beside them."""
    if new.exists():
        raise ValueError(f"two CA keys: {old} and {new}; keep the one that signed {old.parent / CA_CERT} in {new} "
                         f"and delete {old}")
    os.replace(old, new)
    return new


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
