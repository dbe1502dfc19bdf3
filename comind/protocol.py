"""Settings both ends of the wire share."""

from comind.tensors import CHUNK_BYTES

#: Room for a chunk plus a header listing many tensors.
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES

#: How long a pull waits for the next model before answering "not yet".
LONG_POLL_SECONDS = 30.0

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Workers keep connections alive across long rounds; let their pings through.
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
]
