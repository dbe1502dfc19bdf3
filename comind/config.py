"""Settings from flags, ``COMIND_*`` variables and defaults (flag > env > default).

Every setting is declared once as an :class:`Option`; its flag
(``--round-timeout``) and variable (``COMIND_ROUND_TIMEOUT``) derive from its
name, so the two can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

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
    if not value > 0:
        raise ValueError
    return value


_TYPE_NAMES = {positive_int: "a positive integer", non_negative_int: "an integer >= 0",
               positive_float: "a positive number", str: "text"}


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, text: str, source: str) -> Any:
        expected = f"one of {', '.join(self.choices)}" if self.choices else _TYPE_NAMES.get(self.parse, "a valid value")
        try:
            value = self.parse(text)
        except ValueError:
            value = None
        if value is None or (self.choices and value not in self.choices):
            raise ValueError(f"{source} must be {expected}. Received: {source}={text!r}")
        return value


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for option in options:
        shown = "off" if option.default is None else option.default
        parser.add_argument(option.flag, dest=option.name, default=None, metavar=option.name.upper(),
                            help=f"{option.help} [env {option.env}; default {shown}]")


def resolve(options: Sequence[Option], flags: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Each option's value: its flag if given, else its variable if set, else its default.

    Raises:
        ValueError: a value that does not parse, naming where it came from.
    """
    values = {}
    for option in options:
        given = getattr(flags, option.name, None)
        if given is not None:
            values[option.name] = option.convert(given, option.flag)
        elif environ.get(option.env, "") != "":
            values[option.name] = option.convert(environ[option.env], option.env)
        else:
            values[option.name] = option.default
    return values


# The options of `comind ps`.
PS_OPTIONS = (
    Option("listen", "0.0.0.0:2222", "host:port the ps listens on (port 0 picks a free one)"),
    Option("num_workers", 2, "workers expected: the first round waits for this many", positive_int),
    Option("replicas_to_aggregate", None,
           "updates that close a round (fewer than the workers leaves backups); unset: all live workers",
           positive_int),
    Option("min_updates", 1, "updates a round needs to close at its deadline", positive_int),
    Option("rounds", 20, "rounds to train", positive_int),
    Option("round_timeout", 600.0, "seconds a round waits for stragglers", positive_float),
    Option("lease_seconds", 10.0, "seconds a worker stays live without a heartbeat", positive_float),
    Option("weighting", "examples", "how updates are weighted in the average", str, ("examples", "uniform")),
    Option("checkpoint_dir", None, "directory for durable checkpoints; unset: in memory only"),
    Option("keep_checkpoints", 3, "checkpoints to keep", positive_int),
    Option("max_model_bytes", 4 << 30, "largest model the ps accepts", positive_int),
    Option("max_concurrent_updates", 2, "updates received at once (each holds one model in memory)",
           positive_int),
    Option("exit_grace", 30.0, "seconds to wait for workers to leave after the last round", positive_float),
    Option("metrics_port", 8000, "Prometheus port; 0 turns metrics off", non_negative_int),
    Option("token", None, "shared token every call must carry"),
    Option("token_file", None, "file holding the shared token"),
    Option("tls_cert", None, "PEM certificate of the ps"),
    Option("tls_key", None, "PEM private key of the ps"),
    Option("tls_ca", None, "PEM CA: when set, clients must present certificates it signed (mutual TLS)"),
    Option("log_level", "info", "logging level", str, ("debug", "info", "warning", "error")),
)
