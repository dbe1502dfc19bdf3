"""A private certificate authority for one cluster: ``comind certificates``.

TLS should not need a PKI. This makes a CA, signs the ps's server
certificate (and, for mutual TLS, client certificates for the workers), and
then forgets the CA's key: nobody can issue another certificate for the
cluster afterwards, so the only key worth stealing from the folder is the
ps's own. Compose runs it once into a volume; on bare machines, copy
``ca.pem`` to the workers. Needs the ``tls`` extra (cryptography); the ps and
the workers never import this module.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from comind import atomic

#: Written last: its presence means the folder is complete and is left as it is.
CA_FILE = "ca.pem"


@dataclasses.dataclass(frozen=True)
class Issued:
    """A PEM certificate and its PEM (PKCS #8, unencrypted) private key."""

    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class Authority:
    """A self-signed EC P-256 CA, valid for ``days``, that issues leaf certificates."""

    def __init__(self, name: str, days: float = 365):
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._days = days
        self._cert = (self._valid(x509.CertificateBuilder()).subject_name(_name(name)).issuer_name(_name(name))
                      .public_key(self._key.public_key())
                      .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                   content_commitment=False, key_encipherment=False,
                                                   data_encipherment=False, key_agreement=False,
                                                   encipher_only=False, decipher_only=False), critical=True)
                      .sign(self._key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def _valid(self, builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        # Valid from a little in the past, so clocks a few minutes apart agree.
        now = datetime.datetime.now(datetime.UTC)
        return (builder.serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=10))
                .not_valid_after(now + datetime.timedelta(days=self._days)))

    def issue(self, common_name: str, *, server: bool = False, client: bool = False,
              hosts: Sequence[str] = ()) -> Issued:
        """A leaf certificate; ``hosts`` (DNS names or IP addresses) are the names a server answers to."""
        if not (server or client):
            raise ValueError(f"A certificate is for a server, a client or both. Received: server={server}, "
                             f"client={client}")
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (self._valid(x509.CertificateBuilder()).subject_name(_name(common_name))
                   .issuer_name(self._cert.subject).public_key(key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        return Issued(builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM),
                      key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))


def _write(path: Path, data: bytes, mode: int) -> None:
    with atomic.replacing(path) as temporary:
        temporary.write_bytes(data)
        os.chmod(temporary, mode)


def write_cluster(directory: str | os.PathLike, hosts: Sequence[str], workers: int = 0) -> list[Path] | None:
    """Writes ``ca.pem``, ``ps.pem`` and ``ps-key.pem``, and ``worker-N.pem``/``-key.pem`` for mutual TLS.

    Returns the files written, or None when ``directory`` already holds a
    complete set: a second run keeps the cluster's certificates.

    Raises:
        ValueError: ``directory`` holds a cluster's certificates, but not a
            client certificate asked for; its CA's key is gone, so none can
            be added.
    """
    if not hosts:
        raise ValueError("The ps's certificate needs at least one host name or address that workers dial, "
                         "such as ps or 10.0.0.5. Received: hosts=[]")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more. Received: workers={workers}")
    folder = Path(directory)
    if (folder / CA_FILE).exists():
        missing = [f"worker-{i}" for i in range(workers) if not (folder / f"worker-{i}.pem").exists()]
        if missing:
            raise ValueError(f"{folder} already holds a cluster's certificates, but none for {', '.join(missing)}, "
                             f"and its CA's key is gone, so none can be added. To start over, remove the folder "
                             f"(every worker and the ps then need the new files). Received: workers={workers}")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    authority = Authority("comind cluster CA")
    leaves = {"ps": authority.issue("ps", server=True, hosts=hosts)}
    leaves.update({f"worker-{i}": authority.issue(f"worker-{i}", client=True) for i in range(workers)})
    written = []
    for stem, issued in leaves.items():
        _write(folder / f"{stem}-key.pem", issued.key, 0o600)
        _write(folder / f"{stem}.pem", issued.cert, 0o644)
        written += [folder / f"{stem}.pem", folder / f"{stem}-key.pem"]
    _write(folder / CA_FILE, authority.pem, 0o644)
    return [folder / CA_FILE, *written]


def run_certificates(out: str, hosts: str, workers: int = 0) -> int:
    """`comind certificates`: :func:`write_cluster` into ``out`` for comma-separated ``hosts``, saying what it did."""
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    written = write_cluster(out, names, workers)
    if written is None:
        print(f"{out} already holds the cluster's certificates; kept them.")
    else:
        print(f"Wrote {', '.join(p.name for p in written)} to {out}; the CA's key is gone. Give workers "
              f"{written[0]}; the ps's certificate is valid for {', '.join(names)}.")
    return 0
