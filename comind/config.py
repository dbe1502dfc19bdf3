"""Settings from flags, ``COMIND_*`` variables, ``TF_CONFIG`` and defaults.

Every setting is declared once as an :class:`Option`; its flag
(``--round-timeout``) and variable (``COMIND_ROUND_TIMEOUT``) derive from its
name, so the two can never drift apart. A flag wins over a variable, a
variable over ``TF_CONFIG`` (or the original tutorials' cluster flags), and
those over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from comind import presets

ENV_PREFIX = "COMIND_"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def positive_float(text: str) -> float:
    value = float(text)
    # "inf" parses too, and an infinite timeout overflows the waits it is given to.
    if not 0 < value < math.inf:
        raise ValueError
    return value


def fraction_below_half(text: str) -> float:
    value = float(text)
    if not 0 <= value < 0.5:
        raise ValueError
    return value


def address(text: str) -> str:
    host, _, port = text.rpartition(":")
    # isascii(): isdigit() admits other scripts' digits ("٢٢٢٢"), which int() reads but gRPC does not.
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError
    return text


def dataset_name(text: str) -> str:
    if text not in DATASETS and not text.endswith(".npz"):
        raise ValueError
    return text


def model_spec(text: str) -> str:
    module, _, function = text.partition(":")
    if text not in MODELS and not (module and function):
        raise ValueError
    return text


# Known here without importing the modules that define them (and TensorFlow).
DATASETS = ("digits", "fashion_mnist", "cifar10")
MODELS = ("basic", "advanced")

_TYPE_NAMES = {positive_int: "a positive integer", non_negative_int: "an integer >= 0",
               positive_float: "a positive, finite number", address: "host:port (a port from 0 to 65535)",
               fraction_below_half: "a number from 0 up to, not including, 0.5",
               dataset_name: f"one of {', '.join(DATASETS)}, or a path to a .npz file",
               model_spec: f"one of {', '.join(MODELS)}, or module:function for your own", str: "text"}

PS, WORKER, TRAIN = "ps", "worker", "train"


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    roles: frozenset[str]
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value: Any, source: str) -> Any:
        if not isinstance(value, str):  # already typed (from TF_CONFIG)
            return value
        expected = f"one of {', '.join(self.choices)}" if self.choices else _TYPE_NAMES.get(self.parse, "valid")
        try:
            converted = self.parse(value)
        except ValueError:
            converted = None
        if converted is None or (self.choices and converted not in self.choices):
            raise ValueError(f"{source} must be {expected}. Received: {source}={value!r}")
        return converted


def _option(name, default, help, roles, parse=str, choices=None) -> Option:
    return Option(name, default, help, frozenset(roles), parse, choices)


_ALL = (PS, WORKER, TRAIN)
_CLUSTER = (PS, WORKER)

OPTIONS = (
    _option("role", None, "ps or worker (for `comind run`; else from TF_CONFIG or --job_name)", (), str,
            ("ps", "worker")),
    # Where things are.
    _option("listen", "0.0.0.0:2222", "host:port the ps listens on (port 0 picks a free one)", (PS,), address),
    _option("ps_address", "localhost:2222", "host:port of the ps, for workers", (WORKER,), address),
    _option("task_index", 0, "this worker's index; 0 is the chief", (WORKER,), non_negative_int),
    # What is trained, and how long.
    _option("model", "basic", "basic, advanced, or module:function for your own", (WORKER, TRAIN), model_spec),
    _option("dataset", "digits", "digits (embedded), fashion_mnist, cifar10, or a .npz path", _ALL,
            dataset_name),
    _option("data_dir", None, "directory with the original Fashion-MNIST or CIFAR-10 files", (WORKER, TRAIN)),
    _option("shard", "contiguous", "how the training data is split across workers", (WORKER,), str,
            ("contiguous", "iid", "dirichlet", "none")),
    _option("dirichlet_alpha", 0.5, "concentration of the non-IID split: smaller is more skewed", (WORKER,),
            positive_float),
    _option("seed", 0, "random seed of the split and the initial weights", (WORKER, TRAIN), non_negative_int),
    _option("batch_size", 32, "examples per local step", (WORKER, TRAIN), positive_int),
    _option("learning_rate", 1e-3, "Adam learning rate of the built-in models", (WORKER, TRAIN), positive_float),
    _option("num_workers", 2, "workers expected (quorum, sharding)", _CLUSTER, positive_int),
    _option("interval_steps", 100, "local steps between syncs (1: synchronous data-parallel)", _CLUSTER,
            positive_int),
    _option("rounds", None, "rounds to train; unset: the data set's preset", _CLUSTER, positive_int),
    _option("steps", None, "local steps to train (comind train); unset: the data set's preset", (TRAIN,),
            positive_int),
    _option("eval_every", None, "the chief evaluates every this many rounds; unset: about 100 times in all",
            (WORKER,), positive_int),
    _option("output_dir", "./comind-output", "where the chief writes the model and pictures", (WORKER, TRAIN)),
    # The ps's rules.
    _option("replicas_to_aggregate", None,
            "updates that close a round (fewer than the workers leaves backups); unset: all live workers",
            (PS,), positive_int),
    _option("min_updates", 1, "updates a round needs to close at its deadline", (PS,), positive_int),
    _option("round_timeout", 600.0, "seconds a round waits for stragglers", (PS,), positive_float),
    _option("lease_seconds", 10.0, "seconds a worker stays live without a heartbeat", (PS,), positive_float),
    _option("weighting", "examples", "how updates are weighted in the average (the mean only)", (PS,), str,
            ("examples", "uniform")),
    # Robust aggregation (comind/robust.py).
    _option("aggregation", "mean",
            "how a round's updates are combined: mean (streamed, memory for one model), or median or trimmed-mean "
            "(coordinate-wise, unweighted; outvote a minority of poisoned updates but hold every update of a "
            "round in memory)", (PS,), str, ("mean", "median", "trimmed-mean")),
    _option("trim_fraction", 0.25,
            "trimmed-mean drops this fraction of the updates from each end of every coordinate (floor of it "
            "times the updates; a round with too few to trim takes the median)", (PS,), fraction_below_half),
    _option("max_update_norm", None,
            "bound on the L2 norm of each update's change from the global model: longer changes are scaled "
            "down to it; unset: no bound", (PS,), positive_float),
    _option("checkpoint_dir", None, "directory for durable checkpoints; unset: in memory only", (PS,)),
    _option("keep_checkpoints", 3, "checkpoints to keep", (PS,), positive_int),
    _option("max_model_bytes", 4 << 30, "largest model the ps accepts", (PS,), positive_int),
    _option("max_concurrent_updates", 2, "updates received at once (each holds one model in memory)", (PS,),
            positive_int),
    _option("exit_grace", 30.0, "seconds to wait for workers to leave after the last round", (PS,),
            positive_float),
    _option("unreachable_timeout", 600.0, "seconds a worker keeps retrying an unreachable ps", (WORKER,),
            positive_float),
    # Operations.
    _option("metrics_port", 8000, "Prometheus port; 0 turns metrics off", _CLUSTER, non_negative_int),
    _option("token", None, "shared token every call must carry", _CLUSTER),
    _option("token_file", None, "file holding the shared token", _CLUSTER),
    _option("tls_cert", None, "PEM certificate (the ps's, or a worker's own for mutual TLS)", _CLUSTER),
    _option("tls_key", None, "PEM private key of that certificate", _CLUSTER),
    _option("tls_ca", None, "PEM CA: a worker verifies the ps with it; a ps given one requires client "
                            "certificates it signed (mutual TLS)", _CLUSTER),
    _option("log_level", "info", "logging level", _ALL, str, ("debug", "info", "warning", "error")),
)


def options_for(*roles: str) -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if o.roles & set(roles))


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for option in options:
        shown = "unset" if option.default is None else option.default
        parser.add_argument(option.flag, dest=option.name, default=None, metavar=option.name.upper(),
                            help=f"{option.help} [env {option.env}; default {shown}]")


def resolve(options: Sequence[Option], flags: argparse.Namespace, environ: Mapping[str, str],
            cluster: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Each option's value: its flag, else its variable, else ``cluster`` (from TF_CONFIG), else its default.

    Raises:
        ValueError: a value that does not parse, naming where it came from.
    """
    cluster = cluster or {}
    values = {}
    for option in options:
        given = getattr(flags, option.name, None)
        if given is not None:
            values[option.name] = option.convert(given, option.flag)
        elif environ.get(option.env, "") != "":
            values[option.name] = option.convert(environ[option.env], option.env)
        elif option.name in cluster:
            values[option.name] = option.convert(cluster[option.name], "TF_CONFIG")
        else:
            values[option.name] = option.default
    if "rounds" in values and values["rounds"] is None:
        values["rounds"] = presets.default_rounds(values["dataset"], values["interval_steps"])
    return values
