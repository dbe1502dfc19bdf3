"""The ServerApp, on Flower's legacy path: FedAvg over every node, with the SecAgg+ workflow or without it.

The model comes from the run config's ``model-path`` (an ``.npz`` of float32 arrays that bench/secagg_flower.py
writes: bench/secagg.py's model). The clients send deltas, as coMind's workers do, so SecAgg+'s clipping range
bounds what each worker changed, as coMind's does, rather than the weights; ``DeltaFedAvg`` adds their weighted
mean to its model. Per round it writes a JSON line to ``record-path``: when the new model existed and how far the
mean delta it unmasked is from the true ``change`` (a check that the sum was really recovered).
"""

from __future__ import annotations

import json
import time
import traceback

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

#: SecAgg+'s masks and sums live in Z_{2^32}, as coMind's do (Flower's default too).
MODULUS = 2**32

app = ServerApp()


class DeltaFedAvg(FedAvg):
    def __init__(self, model: list[np.ndarray], change: float, record_path: str, **kwargs):
        super().__init__(initial_parameters=ndarrays_to_parameters(model), **kwargs)
        self.model, self.change, self.record_path = model, change, record_path

    def aggregate_fit(self, server_round, results, failures):
        if failures:
            raise RuntimeError(f"Round {server_round}: {len(failures)} nodes failed: {failures}")
        mean, metrics = super().aggregate_fit(server_round, results, failures)
        delta = parameters_to_ndarrays(mean)
        self.model = [m + d.astype(m.dtype) for m, d in zip(self.model, delta, strict=True)]
        record = {"round": server_round, "closed": time.time(), "updates": len(results),
                  "error": max(float(np.abs(d - self.change).max()) for d in delta)}
        with open(self.record_path, "a") as file:
            file.write(json.dumps(record) + "\n")
        return ndarrays_to_parameters(self.model), metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    workers, clip_range = int(config["num-workers"]), float(config["clip-range"])
    with np.load(str(config["model-path"]), allow_pickle=False) as arrays:
        model = [arrays[name] for name in arrays.files]
    strategy = DeltaFedAvg(model, float(config["change"]), str(config["record-path"]), fraction_fit=1.0,
                           fraction_evaluate=0.0, min_fit_clients=workers, min_available_clients=workers)
    # As coMind's defaults for a small round: every party holds a share of every other's secrets (num_shares
    # 1.0: all), the smallest majority rebuilds them, each value in [-clip-range, clip-range], and levels as
    # fine as n values can be while their sum stays below the modulus, with a bit to spare (2^32 / 2n; coMind's
    # encoding has about 2^32 / n; Flower's default is 2^22).
    secagg = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=workers // 2 + 1, clipping_range=clip_range,
                                quantization_range=MODULUS // (2 * workers), modulus_range=MODULUS)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=int(config["num-server-rounds"])),
                           strategy=strategy)
    try:
        DefaultWorkflow(fit_workflow=secagg if config["secure-aggregation"] else None)(grid, legacy)
    except Exception:
        # The bench watches this file, not the ServerApp process (the SuperLink starts that one).
        with open(str(config["record-path"]), "a") as file:
            file.write(json.dumps({"failed": traceback.format_exc()}) + "\n")
        raise
