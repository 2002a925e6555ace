"""Keys for a secure Flower deployment (what `cotune keys` writes), made with the
`cryptography` library.

A key folder holds

- `ca.crt`, `ca.key`: a certificate authority (EC P-384, self-signed), or the files of
  a CA the user already has (`ca_cert` / `ca_key`);
- `server.crt`, `server.key`: the TLS certificate of the SuperLink (or of a split
  `cotune cloud`), signed by the CA, valid for the host names / IP addresses it is
  reached at;
- `nodes/<name>.key`, `nodes/<name>.pub`: one EC P-384 key pair per SuperNode in
  OpenSSH format (what `flower-supernode --auth-supernode-private-key` and
  `flwr supernode register` read).

Private keys are written readable by their owner only (0600). The SuperNodes get
`ca.crt` and their own `.key`; the SuperLink gets its certificate and key; the public
keys are registered with the SuperLink (`flwr supernode register`).
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
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cotune.errors import ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODES_DIR = "nodes"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
CERT_DAYS = 825
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class KeyFolder:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def node_key(self, name: str) -> Path:
        return self.root / NODES_DIR / f"{name}.key"

    def node_pub(self, name: str) -> Path:
        return self.root / NODES_DIR / f"{name}.pub"

    def node_names(self) -> list[str]:
        folder = self.root / NODES_DIR
        return sorted(p.stem for p in folder.glob("*.pub")) if folder.is_dir() else []


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cotune"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise ConfigError(
                    f"--host {host!r} is neither an IP address nor a DNS name; give the "
                    "name or address the SuperNodes reach the SuperLink at"
                ) from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(keys: KeyFolder) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("cotune federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    _write_private(keys.ca_key, _pem_key(key))
    keys.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(keys: KeyFolder) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(keys.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{keys.ca_key}: the CA key must be an EC or RSA private key")
    return cert, key  # type: ignore[return-value]


def make_server_cert(keys: KeyFolder, hosts: list[str]) -> None:
    """A SuperLink certificate for `hosts`, signed by the folder's CA."""
    ca_cert, ca_key = _load_ca(keys)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(keys.server_key, _pem_key(key))
    keys.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def add_node(keys: KeyFolder, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """A new SuperNode key pair `nodes/<name>.key` (private) and `.pub`; returns both."""
    if not NODE_NAME.match(name):
        raise ConfigError(
            f"node name {name!r}: use letters, digits, '.', '_' or '-' (up to 64), "
            "starting with a letter or digit"
        )
    private, public = keys.node_key(name), keys.node_pub(name)
    if private.exists() and not force:
        raise ConfigError(
            f"{private} exists already; pick another name, or pass --force to replace "
            "the key (the old one must then be unregistered from the SuperLink)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public.write_bytes(pub + f" cotune-{name}\n".encode())
    return private, public


def init_keys(
    root: str | Path,
    *,
    hosts: list[str] | None = None,
    nodes: list[str] | None = None,
    ca_cert: str | Path | None = None,
    ca_key: str | Path | None = None,
    force: bool = False,
) -> KeyFolder:
    """A key folder: a CA (new, or the given `ca_cert` + `ca_key`), a server certificate
    for `hosts` and the loopback names, and a key pair per name in `nodes`."""
    keys = KeyFolder(Path(root))
    if keys.ca_key.exists() and not force:
        raise ConfigError(
            f"{keys.root} holds keys already ({CA_KEY}); add nodes with `cotune keys "
            "add-node`, or pass --force to make a new CA (every SuperNode then needs the "
            "new ca.crt)"
        )
    if (ca_cert is None) != (ca_key is None):
        raise ConfigError("--ca-cert and --ca-key must be given together (a CA of yours)")
    keys.root.mkdir(parents=True, exist_ok=True)
    os.chmod(keys.root, 0o700)
    if ca_cert is not None and ca_key is not None:
        for path, what in ((ca_cert, "--ca-cert"), (ca_key, "--ca-key")):
            if not Path(path).is_file():
                raise ConfigError(f"{what}: file {str(path)!r} does not exist")
        keys.ca_cert.write_bytes(Path(ca_cert).read_bytes())
        _write_private(keys.ca_key, Path(ca_key).read_bytes())
        try:
            _load_ca(keys)
        except ValueError as err:
            raise ConfigError(
                f"--ca-cert / --ca-key: not a PEM certificate and private key ({err})"
            ) from None
    else:
        make_ca(keys)
    # the loopback names too: `flwr` on the server's own machine reaches it at 127.0.0.1
    make_server_cert(keys, list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS])))
    for name in nodes or []:
        add_node(keys, name, force=force)
    return keys
