"""The ClientApp: each round, the global model plus ``change`` in every value, sent back as the change (a delta,
as coMind's workers send); through Flower's SecAgg+ mod when the server runs the SecAgg+ workflow.

``wire_mod`` counts every message's bytes as they cross between SuperNode and SuperLink. Flower ships a message
as a tree of content-addressed objects (the message, its RecordDict, each record, each Array and its chunks),
which the SuperNode pulls from and pushes to the SuperLink: the mod sums the deflated size of each distinct object
of the message the node received and of its reply (gRPC framing, object IDs and the tree itself not counted), and
writes a JSON line per message to the run config's ``wire-path``, with where the time went: from the start of the
ClientApp process (Flower starts one per message) to the message reaching the mod, and the mods' and client's
work on it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import psutil
from flwr.app import Context, Message
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

#: Examples each worker reports a round, as bench/secagg.py's workers do (FedAvg's weight).
NUM_EXAMPLES = 100


class ChangeClient(NumPyClient):
    def __init__(self, change: float):
        self.change = change

    def fit(self, parameters, config):
        trained = [p + np.asarray(self.change, p.dtype) for p in parameters]
        return [t - p for t, p in zip(trained, parameters, strict=True)], NUM_EXAMPLES, {}


def secure_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod for its workflow's messages; a plain round's message goes straight to the client."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def wire_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reached = time.time()
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = str(configs[Key.STAGE]) if configs is not None else "plain"  # read first: the SecAgg+ mod pops it
    received, model = _wire_bytes(msg), _array_bytes(msg)
    reply = call_next(msg, context)
    replied = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    masked = sum(len(b) for b in replied[Key.MASKED_PARAMETERS]) if replied and Key.MASKED_PARAMETERS in replied \
        else 0
    line = {"node": int(context.node_config["partition-id"]), "round": int(msg.metadata.group_id), "stage": stage,
            "received": received, "sent": _wire_bytes(reply), "model": model, "update": _array_bytes(reply) + masked,
            "start_seconds": reached - psutil.Process().create_time(), "work_seconds": time.time() - reached}
    with open(str(context.run_config["wire-path"]), "a") as file:
        file.write(json.dumps(line) + "\n")
    return reply


def _wire_bytes(msg: Message) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def _array_bytes(msg: Message) -> int:
    """The tensors' bytes (NumPy ``.npy`` form, as Flower ships them) in the message's ArrayRecords."""
    return sum(len(array.data) for record in msg.content.array_records.values() for array in record.values())


app = ClientApp(client_fn=lambda context: ChangeClient(float(context.run_config["change"])).to_client(),
                mods=[wire_mod, secure_when_asked])
