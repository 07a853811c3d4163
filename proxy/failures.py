"""One readable line for an upstream transport failure.

What a client sees in an error's ``detail`` and what the log says: "cannot connect
to registry-1.docker.io:443: Name or service not known", never a Python repr.
"""

from __future__ import annotations

import os
import socket
import ssl

import aiohttp
from yarl import URL


def where(url: URL) -> str:
    return f"{url.host}:{url.port}"


def describe_failure(
    exc: BaseException,
    url: URL,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    total_timeout: float | None = None,
) -> str:
    """Why talking to ``url`` failed, in words; the timeouts, when known, are
    the ones the request ran under."""
    at = where(url)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of {at} not accepted: {_reason(exc.certificate_error)}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {at}: {_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{at} sent an invalid answer ({exc.message})"
    # The first kind that matches: aiohttp's own timeouts before TimeoutError.
    plain: tuple[tuple[type[BaseException], str], ...] = (
        (
            aiohttp.ConnectionTimeoutError,
            f"cannot connect to {at}: timed out{_after(connect_timeout)}",
        ),
        (aiohttp.SocketTimeoutError, f"{at} sent nothing{_for(read_timeout)}"),
        (TimeoutError, f"{at} did not answer in full{_within(total_timeout)}"),
        (aiohttp.ServerDisconnectedError, f"{at} closed the connection"),
        (aiohttp.ClientPayloadError, f"{at} sent a broken body"),
        (aiohttp.InvalidURL, f"unusable URL for {at}"),
    )
    for kind, words in plain:
        if isinstance(exc, kind):
            return words
    if isinstance(exc, OSError):
        return f"connection to {at} failed: {_reason(exc)}"
    return f"connection to {at} failed ({type(exc).__name__})"


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or type(error).__name__
    if isinstance(error, socket.gaierror) and error.strerror:
        return error.strerror  # "Name or service not known"
    if isinstance(error, OSError) and error.errno:
        # asyncio's strerror is "Connect call failed ('10.0.0.1', 443)".
        return os.strerror(error.errno)
    return str(error) or type(error).__name__


def _after(seconds: float | None) -> str:
    return "" if seconds is None else f" after {seconds:g} s"


def _for(seconds: float | None) -> str:
    return " for a while" if seconds is None else f" for {seconds:g} s"


def _within(seconds: float | None) -> str:
    return "" if seconds is None else f" within {seconds:g} s"
