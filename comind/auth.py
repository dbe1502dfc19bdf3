"""Shared-token authentication and TLS (docs/design.md, decision 9).

Every call carries ``authorization: Bearer <token>`` metadata; the ps
compares it in constant time. TLS encrypts the channel; when the ps is given
a CA, it also requires client certificates signed by it (mutual TLS).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
#: Longest token: gRPC refuses headers much beyond a few kilobytes.
MAX_TOKEN_BYTES = 4096


def load_token(token: str | None, token_file: str | None) -> str | None:
    """The token given inline or in a file (trailing whitespace dropped)."""
    if token and token_file:
        raise ValueError("Give the token or a token file, not both. Received: token=<hidden>, "
                         f"token_file={token_file!r}")
    if token_file:
        try:
            with open(token_file, "rb") as file:
                token = file.read(MAX_TOKEN_BYTES + 1).decode().strip()  # bounded: it may be /dev/zero
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"Cannot read the token file: {error}. Received: token_file={token_file!r}") from None
        if not token:
            raise ValueError(f"The token file is empty. Received: token_file={token_file!r}")
    # gRPC sends the token as a header value: printable ASCII of a few kilobytes at most.
    if token and (len(token) > MAX_TOKEN_BYTES or not (token.isascii() and token.isprintable())):
        raise ValueError(f"The token must be printable ASCII (letters, digits, punctuation) of at most "
                         f"{MAX_TOKEN_BYTES} characters, such as `head -c 32 /dev/urandom | xxd -p -c 64`. "
                         f"Received: token=<hidden, {len(token)} characters>, token_file={token_file!r}")
    return token or None


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call without the right token."""

    def __init__(self, token: str, on_failure: Callable[[], None] = lambda: None):
        self._expected = f"Bearer {token}".encode()
        self._on_failure = on_failure

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        sent = dict(details.invocation_metadata or ()).get(METADATA_KEY)
        # A str: gRPC gives bytes only for keys that end in -bin.
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._expected):
            return handler
        self._on_failure()
        reason = "no token was sent" if sent is None else "the token is wrong"
        log.warning("Refused %s: %s.", details.method, reason)
        return _refusal(handler, f"Authentication failed: {reason}. Set COMIND_TOKEN or COMIND_TOKEN_FILE "
                                 f"to the ps's token.")


def _refusal(handler: grpc.RpcMethodHandler[Any, Any], message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    return kinds[(handler.request_streaming, handler.response_streaming)](
        abort, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files. On the ps: its certificate and key, and a CA to require client
    certificates. On a worker: the CA that signed the ps's certificate, and a
    certificate and key of its own for mutual TLS."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    def _read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        return None if path is None else _read_pem(name, path)

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ValueError("The ps needs both COMIND_TLS_CERT and COMIND_TLS_KEY for TLS. "
                             f"Received: tls_cert={self.cert!r}, tls_key={self.key!r}")
        ca, key, cert = self._read("ca"), _read_pem("key", self.key), _read_pem("cert", self.cert)
        _check_pair(self.cert, self.key)
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("A client certificate needs its key, and a key its certificate. "
                             f"Received: tls_cert={self.cert!r}, tls_key={self.key!r}")
        ca, key, cert = self._read("ca"), self._read("key"), self._read("cert")
        if self.cert and self.key:
            _check_pair(self.cert, self.key)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _read_pem(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"Cannot read the TLS {name} file: {error}. Received: tls_{name}={path!r}") from None


def _check_pair(cert: str, key: str) -> None:
    """Refuses a certificate and a key that do not belong together: gRPC takes them, and then fails every
    handshake (a ps reports a port it cannot bind, a worker an unreachable ps)."""
    try:
        # An empty password: an encrypted key is refused (gRPC cannot use one), not prompted for.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password="")
    except ssl.SSLError as error:
        problem = "the key is not the certificate's" if error.reason == "KEY_VALUES_MISMATCH" else \
            f"they are not a PEM certificate and its unencrypted private key ({error.reason or error})"
        raise ValueError(f"The TLS certificate {cert!r} and key {key!r} do not go together: {problem}. Set "
                         f"COMIND_TLS_CERT and COMIND_TLS_KEY to a certificate and the key it was made with. "
                         f"Received: tls_cert={cert!r}, tls_key={key!r}") from None
