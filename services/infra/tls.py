"""TLS for a service that terminates it itself (the gateway without a load balancer in front)."""

from __future__ import annotations

import ssl


class TlsError(ValueError):
    pass


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2 and up, HTTP/1.1 by ALPN, the certificate chain and its key from PEM files.
    A missing or mismatched file fails here, at start, with the file named."""
    if not cert_file or not key_file:
        raise TlsError("TLS needs both a certificate and a key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise TlsError(f"TLS file not found: {exc.filename}") from None
    except ssl.SSLError as exc:
        raise TlsError(f"TLS certificate {cert_file} and key {key_file} do not load: "
                       f"{exc.reason or exc}") from None
    return context
