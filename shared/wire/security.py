"""What protects traffic between the services: the internal token and TLS files.

The encode service requires metadata `x-splitvl-token: TOKEN` on every RPC except the standard
health service when it was started with a token; the language service sends the same token. Both
read it from a flag or a file, and both check PEM files before any socket is opened, so a bad file
is one line at start-up instead of a failure on the first connection.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path

from shared.wire.errors import SecurityConfigError

TOKEN_METADATA_KEY = "x-splitvl-token"
TOKEN_ENV = "SPLITVL_INTERNAL_TOKEN"


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """The internal token from a flag value or a file (its first line), checked; None for none."""
    if token and token_file is not None:
        raise SecurityConfigError("give --internal-token or --internal-token-file, not both")
    if token_file is not None:
        try:
            lines = token_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            message = f"cannot read the internal token file {token_file}: {exc}"
            raise SecurityConfigError(message) from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise SecurityConfigError(f"the internal token file {token_file} is empty")
    if not token:
        return None
    # gRPC metadata values are printable ASCII; spaces would be trimmed by some proxies.
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise SecurityConfigError("the internal token must be printable ASCII without spaces")
    return token


def secrets_match(supplied: str | bytes | None, expected: str) -> bool:
    """Constant-time comparison of a received secret (metadata value, bearer token) with the
    expected one. Both are hashed first, so neither the time taken nor the early exit on a length
    difference says anything about the expected secret."""
    if supplied is None:
        return False
    if isinstance(supplied, str):
        supplied = supplied.encode("utf-8", "backslashreplace")
    return hmac.compare_digest(
        hashlib.sha256(supplied).digest(), hashlib.sha256(expected.encode()).digest()
    )


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file, or SecurityConfigError naming the flag's role and the path."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"the {what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class TLSFiles:
    """PEM contents for one side of a TLS connection: its own certificate chain and key (a
    server's, or a client's for mutual TLS) and the CA that the other side must be signed by."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    def __repr__(self) -> str:  # the key never reaches a log
        parts = [name for name in ("cert", "key", "ca") if getattr(self, name) is not None]
        return f"TLSFiles({', '.join(parts)})"


def load_tls_files(
    cert: Path | None, key: Path | None, ca: Path | None, role: str
) -> TLSFiles | None:
    """Read and check a certificate / key pair and a CA; None when no file is given.

    `role` names the flags in messages ("--tls" or "--encode-tls"). The pair is loaded the way a
    TLS stack loads it, so a key that does not belong to its certificate is caught here.
    """
    if cert is None and key is None and ca is None:
        return None
    if (cert is None) != (key is None):
        raise SecurityConfigError(f"{role}-cert and {role}-key go together; give both")
    if cert is not None:
        cert_pem = read_pem(cert, f"certificate ({role}-cert)")
        key_pem = read_pem(key, f"private key ({role}-key)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_cert_chain(cert, key, password=lambda: "")
        except (ssl.SSLError, OSError) as exc:
            raise SecurityConfigError(
                f"{role}-cert {cert} and {role}-key {key} are not a usable certificate and "
                f"unencrypted key pair: {exc}"
            ) from None
    else:
        cert_pem = key_pem = None
    ca_pem = None
    if ca is not None:
        ca_pem = read_pem(ca, f"CA certificate ({role}-ca)")
        try:
            ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            message = f"{role}-ca {ca} holds no usable certificate: {exc}"
            raise SecurityConfigError(message) from None
    return TLSFiles(cert_pem, key_pem, ca_pem)
