"""The ClientApp: ``local-steps`` steps of Adam on this node's shard, from the global model.

Flower starts a fresh ClientApp process for every message, so whatever
coMind's long-lived worker keeps in memory between rounds must travel in
the node's ``context.state`` to train the same way: Adam's moments and step
count (coMind keeps them across syncs) and the position in this node's
shuffled pass over its shard (coMind's ``model.fit`` keeps going through it).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbench.task import build_model, partition

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, node = context.run_config, context.node_config
    x, y = partition(config["data-path"], int(node["partition-id"]), int(node["num-partitions"]))
    model = build_model(config["seed"], config["learning-rate"])
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    _restore_optimizer(model, context)
    examples = config["local-steps"] * config["batch-size"]
    position = int(context.state["progress"]["examples"]) if "progress" in context.state else 0
    chosen = _next_examples(position, examples, len(y), seed=config["seed"])
    started = time.perf_counter()
    history = model.fit(x[chosen], y[chosen], batch_size=config["batch-size"], epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - started
    context.state["optimizer"] = ArrayRecord([np.asarray(v) for v in model.optimizer.variables])
    context.state["progress"] = MetricRecord({"examples": position + examples})
    metrics = MetricRecord({"num-examples": examples, "train-seconds": seconds,
                            "loss": float(history.history["loss"][-1])})
    return Message(RecordDict({"arrays": ArrayRecord(model.get_weights()), "metrics": metrics}), reply_to=msg)


def _restore_optimizer(model, context: Context) -> None:
    if "optimizer" not in context.state:
        return  # the first round: a fresh Adam, as coMind's worker starts with
    model.optimizer.build(model.trainable_variables)
    for variable, value in zip(model.optimizer.variables, context.state["optimizer"].to_numpy_ndarrays(), strict=True):
        variable.assign(value)


def _next_examples(position: int, count: int, size: int, seed: int) -> np.ndarray:
    """Examples ``position`` to ``position + count`` of an endless pass, reshuffled every epoch as ``fit`` does."""
    first, last = position // size, (position + count - 1) // size
    order = np.concatenate([np.random.default_rng([seed, epoch]).permutation(size)
                            for epoch in range(first, last + 1)])
    start = position - first * size
    return order[start:start + count]
