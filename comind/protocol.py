"""Settings both ends of the wire share."""

from comind.tensors import CHUNK_BYTES

#: Room for a chunk plus a header listing many tensors.
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES

#: How long a Round call waits for the next model before answering "not yet", unless the ps says otherwise
#: (``--long-poll-seconds``, in its JoinReply): under the 60 s after which proxies such as nginx end a silent stream.
LONG_POLL_SECONDS = 30.0

#: A model transfer may take this long plus its size at the rate below. The
#: ps cuts a transfer off at this bound and a worker's call allows for it, so
#: a slow link that one side accepts the other does too.
MIN_TRANSFER_SECONDS = 30.0
MIN_BYTES_PER_SECOND = 1e6

#: Trailing metadata of a refusal that may succeed later: the seconds to wait before trying again.
RETRY_AFTER_KEY = "comind-retry-after-seconds"

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Workers keep connections alive across long rounds; let their pings through.
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def transfer_seconds(nbytes: int) -> float:
    """The longest a model of ``nbytes`` may take to cross the wire, waiting for a free slot included."""
    return MIN_TRANSFER_SECONDS + nbytes / MIN_BYTES_PER_SECOND


def round_call_seconds(update_bytes: int, model_bytes: int, long_poll_seconds: float = LONG_POLL_SECONDS) -> float:
    """A worker's deadline for a Round call: its update up, the ps's long poll, the model down."""
    return transfer_seconds(update_bytes) + long_poll_seconds + transfer_seconds(model_bytes)
