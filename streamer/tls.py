"""HTTPS for `serve`: a certificate the user gives, or a self-signed one made on request.

Browsers give the camera only to pages served from localhost or over HTTPS, so a server that
other machines use needs TLS. `--self-signed` makes a certificate (ECDSA P-256, a year) for
this machine's names and addresses, keeps it in the cache directory, and reuses it while it
is valid and covers the same names; the browser warns once and the user accepts it after
comparing the SHA-256 fingerprint `serve` prints.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

VALID_DAYS = 365
RENEW_DAYS = 7  # make a new certificate when the cached one expires within this


class TLSError(ValueError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xportrait" / "tls"


def host_names(host: str) -> list[str]:
    """The names and addresses a browser may use to reach a server bound to `host`."""
    names = ["localhost", "127.0.0.1", "::1"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    if host in ("0.0.0.0", "::", ""):
        import ifaddr  # aioice's own dependency: the machine's interface addresses

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
                if address not in names and not address.startswith("fe80"):
                    names.append(address)
    elif host not in names:
        names.append(host)
    return names


def self_signed(names: list[str], directory: Path | None = None) -> tuple[Path, Path]:
    """A certificate for `names` (reused from `directory` when still good): (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = directory or cache_dir()
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    wanted = _alt_names(names)
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
            if set(have) >= set(wanted) and left > datetime.timedelta(days=RENEW_DAYS):
                return cert_path, key_path
        except (ValueError, x509.ExtensionNotFound):
            pass  # unreadable: make a new one
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"xportrait on {socket.gethostname()}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the key is private
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _alt_names(names: list[str]) -> list:
    from cryptography import x509

    out = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def fingerprint(cert_path: Path) -> str:
    """SHA-256 of the certificate, as browsers show it (AA:BB:...)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def server_context(cert_path: str | Path, key_path: str | Path) -> ssl.SSLContext:
    """An SSLContext for serving, or a TLSError that names the file at fault."""
    for what, path in (("certificate", cert_path), ("key", key_path)):
        if not os.path.isfile(path):
            raise TLSError(f"TLS {what} file not found: {path}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    def no_password():
        raise TLSError(f"the TLS key {key_path} is encrypted: serve needs an unencrypted key "
                       "(openssl pkey -in KEY -out PLAIN_KEY)")

    try:
        context.load_cert_chain(str(cert_path), str(key_path), password=no_password)
    except ssl.SSLError as exc:
        raise TLSError(f"cannot use the TLS certificate {cert_path} with the key {key_path}: "
                       f"{exc.reason or exc} (both PEM; the key must match the certificate)") from None
    return context
