"""HTTPS: the server's TLS context, and replacing it when the certificate is renewed.

A new context is built from the files on SIGHUP and used for connections accepted
from then on; a connection keeps the context it was accepted with, so renewing a
certificate drops nobody. Files that cannot be loaded leave the old context in
place (logged), so a half-copied renewal never takes HTTPS down.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


class TLSError(Exception):
    """The certificate or key cannot be used; the message names the file and cause."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with modern defaults: TLS 1.2 or later, the ciphers Python's
    OpenSSL build considers secure, no compression, no session tickets (resumption
    through tickets keys would outlive a certificate change)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TLSError(f"cannot read {exc.filename or cert}: no such file") from None
    except PermissionError as exc:
        raise TLSError(f"cannot read {exc.filename or cert}: permission denied") from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise TLSError(f"tls_cert {cert} / tls_key {key}: {reason}") from None
    return context


class ServerTLS:
    """The context new connections get; :meth:`reload` replaces it from the files."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = server_context(cert, key)

    def reload(self) -> bool:
        """Load the files again; False (and the old context kept) when they fail."""
        try:
            context = server_context(self.cert, self.key)
        except TLSError as exc:
            failure = str(exc)
        else:
            self.context = context
            log.info("TLS certificate reloaded from %s", self.cert)
            return True
        log.error("TLS certificate not reloaded, keeping the current one: %s", failure)
        return False
