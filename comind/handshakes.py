"""Why a worker's TLS (or plain-text) connection to the ps failed, where no retry can change it.

gRPC reports a failure on the worker's own side of a handshake in the status
details (an untrusted or misnamed ps certificate, a ps that does not speak
TLS). When the ps refuses the handshake, the worker sees only
a closed socket, as it would from a proxy with no ps behind it: a plain-text
worker against a TLS ps, or a mutual-TLS ps refusing this worker's client
certificate (or its lack of one). gRPC's ps logs why only at
``GRPC_VERBOSITY=info``, without the peer's address, and tells Python
nothing. So on a closed socket the worker asks the ps itself, with a TLS
hello of its own that trusts any certificate (:func:`probe`): a ps that
answers it speaks TLS; one that completes the handshake and then hangs up
refuses this worker's certificate.
"""

from __future__ import annotations

import enum
import socket
import ssl

from comind.auth import TlsFiles

#: What gRPC's status details say when this side of a TLS handshake failed: a certificate that no retry changes.
OWN_SIDE_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "Peer name", "SSL_ERROR_SSL")
#: What the details say when the ps closed the connection before gRPC's own first frames (a reset: it closed
#: with bytes of this side's unread).
CLOSED = ("Socket closed", "Connection reset by peer")
#: What the ps's alert names when it refuses a client certificate during the handshake (TLS 1.2).
_CERTIFICATE_ALERTS = ("ALERT_CERTIFICATE", "ALERT_BAD_CERTIFICATE", "ALERT_UNKNOWN_CA", "ALERT_HANDSHAKE_FAILURE")
#: HTTP/2's connection preface: a gRPC server answers it with its settings.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROBE_SECONDS = 3.0


class Answer(enum.Enum):
    """What the ps did with a TLS hello."""

    SPEAKS_TLS = "completed the handshake and answered"
    REFUSES_CERTIFICATE = "refused this side's certificate, or its lack of one"


def probe(address: str, tls: TlsFiles, timeout: float = PROBE_SECONDS) -> Answer | None:
    """Says hello over TLS to ``address`` with ``tls``'s client certificate, if any; None: no clear answer
    (nothing listens, a plain-text server, a proxy that hangs up)."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # gRPC has checked the ps's certificate
    context.set_alpn_protocols(["h2"])  # as gRPC does: a gRPC server refuses a hello without it
    if tls.cert and tls.key:
        context.load_cert_chain(tls.cert, tls.key)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            try:
                connection = context.wrap_socket(raw, server_hostname=host.strip("[]") or None)
            except ssl.SSLError as error:
                refused = any(alert in str(error.reason) for alert in _CERTIFICATE_ALERTS)
                return Answer.REFUSES_CERTIFICATE if refused else None
            with connection:
                connection.sendall(_PREFACE)
                try:
                    # Under TLS 1.3 the ps checks a client certificate after this side's handshake is done.
                    return Answer.SPEAKS_TLS if connection.recv(1) else Answer.REFUSES_CERTIFICATE
                except (ssl.SSLError, ConnectionResetError):
                    return Answer.REFUSES_CERTIFICATE
    except OSError:
        return None


def reason_to_stop(address: str, tls: TlsFiles, details: str) -> str | None:
    """Why retrying a ps that failed with these status details cannot help, if they (or a :func:`probe`) tell;
    None: it may be merely down."""
    if tls.enabled and any(marker in details for marker in OWN_SIDE_FAILURES):
        if "WRONG_VERSION_NUMBER" in details:
            return (f"The ps at {address} does not speak TLS ({details}): unset COMIND_TLS_CA, COMIND_TLS_CERT and "
                    f"COMIND_TLS_KEY on this worker, or give the ps COMIND_TLS_CERT and COMIND_TLS_KEY.")
        return (f"The TLS handshake with the ps at {address} failed ({details}). Check that COMIND_TLS_CA is the CA "
                f"that signed the ps's certificate, that the certificate names the host in COMIND_PS_ADDRESS, and, "
                f"under mutual TLS, COMIND_TLS_CERT and COMIND_TLS_KEY.")
    if not _closed(details):
        return None
    answer = probe(address, tls)
    closed = f"The ps at {address} closed the connection"
    client_certificate = ("COMIND_TLS_CERT and COMIND_TLS_KEY to a client certificate signed by the CA the ps "
                          "trusts (its COMIND_TLS_CA) and its key")
    if not tls.enabled and answer is not None:
        mutual = answer is Answer.REFUSES_CERTIFICATE
        return (f"{closed}: it speaks {'mutual ' if mutual else ''}TLS, and this worker plain text. Set "
                f"COMIND_TLS_CA to the CA that signed the ps's certificate"
                f"{', and ' + client_certificate if mutual else ''} ({details}).")
    if answer is Answer.REFUSES_CERTIFICATE and not tls.cert:
        return (f"{closed} after the TLS handshake: it requires a client certificate (mutual TLS). Set "
                f"{client_certificate} ({details}).")
    if answer is Answer.REFUSES_CERTIFICATE:
        return (f"{closed} after the TLS handshake: it refuses this worker's client certificate {tls.cert!r}. Check "
                f"that the CA the ps trusts (its COMIND_TLS_CA) signed it, and that it has not expired ({details}).")
    return None


def likely_cause(details: str) -> str:
    """What to check, for a failure that may be TLS but may be a ps merely away ("" if it cannot be TLS)."""
    if not _closed(details):
        return ""
    return (" If it runs, it may be refusing the TLS handshake: compare this worker's COMIND_TLS_CA, COMIND_TLS_CERT "
            "and COMIND_TLS_KEY with the ps's (GRPC_VERBOSITY=info on the ps logs why it refused one).")


def _closed(details: str) -> bool:
    return any(marker in details for marker in CLOSED)
