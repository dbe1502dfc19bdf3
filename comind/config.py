"""How a setting is declared, read from text and checked, and offered as a flag and a variable.

A setting is an :class:`Option`; its flag (``--round-timeout``) and variable
(``COMIND_ROUND_TIMEOUT``) derive from its name, so the two can never drift
apart. Which settings each role has, and where their values come from, is
:mod:`comind.settings`.

Choices are taken from the modules that own them, imported when a value is
checked rather than at start: `comind health` stays light (the data sets and
the aggregation rules bring NumPy and protobuf), and nothing here imports
TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from comind.registry import Registry

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


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
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


def fraction_below_one(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError
    return value


def fraction_up_to_one(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError
    return value


def fraction_above_half(text: str) -> float:
    value = float(text)
    if not 0.5 < value <= 1:
        raise ValueError
    return value


#: What a switch accepts, any case; a switch given as a flag alone (``--secure-aggregation``) is on.
_SWITCH = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def switch(text: str) -> bool:
    try:
        return _SWITCH[text.strip().lower()]
    except KeyError:
        raise ValueError from None


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError
    return value


def clip_bound(text: str) -> float | str:
    """A positive, finite number, or ``adaptive`` (worker-level DP's clip)."""
    return "adaptive" if text == "adaptive" else positive_float(text)


def fraction_between(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError
    return value


def address(text: str) -> str:
    host, _, port = text.rpartition(":")
    # isascii(): isdigit() admits other scripts' digits ("٢٢٢٢"), which int() reads but gRPC does not.
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError
    return text


def owned_names(module: str, attribute: str) -> Callable[[], tuple[str, ...]]:
    """The names a choice offers, read from their owner (a tuple or a stage registry) when first needed:
    importing every owner with the settings would make `comind health` heavier."""
    def names() -> tuple[str, ...]:
        owner = getattr(importlib.import_module(module), attribute)
        return owner.names() if isinstance(owner, Registry) else tuple(owner)
    return names


dataset_names = owned_names("comind.datasets", "NAMES")
model_names = owned_names("comind.model_names", "BUILTIN")
shard_methods = owned_names("comind.sharding", "METHODS")
# The round pipeline's choices come from the stages' registries (docs/design.md, decision 11).
aggregation_rules = owned_names("comind.aggregators", "AGGREGATORS")
weightings = owned_names("comind.weighting", "WEIGHTINGS")
server_optimizers = owned_names("comind.server_optimizers", "SERVER_OPTIMIZERS")
model_encodings = owned_names("comind.encodings", "MODEL_ENCODINGS")
rounds_modes = owned_names("comind.async_rounds", "ROUNDS_MODES")


def update_encoding(text: str) -> str:
    """An update encoding of ``comind.encodings.ENCODINGS`` by its canonical name (``topk:0.01``)."""
    return str(importlib.import_module("comind.encodings").parse(text).name)
accountants = owned_names("comind.accountant", "ACCOUNTANTS")


def dataset_name(text: str) -> str:
    if text not in dataset_names() and not text.endswith(".npz"):
        raise ValueError
    return text


def model_spec(text: str) -> str:
    module, _, function = text.partition(":")
    if text not in model_names() and not (module and function):
        raise ValueError
    return text


_TYPE_NAMES: dict[Callable[[str], Any], Callable[[], str]] = {
    positive_int: lambda: "a positive integer", non_negative_int: lambda: "an integer >= 0",
    port: lambda: "a port from 0 to 65535",
    positive_float: lambda: "a positive, finite number", address: lambda: "host:port (a port from 0 to 65535)",
    fraction_below_half: lambda: "a number from 0 up to, not including, 0.5",
    fraction_below_one: lambda: "a number from 0 up to, not including, 1",
    fraction_up_to_one: lambda: "a number more than 0 and at most 1",
    fraction_above_half: lambda: "a number more than 0.5 and at most 1",
    switch: lambda: "true or false (or 1/0, yes/no, on/off)",
    non_negative_float: lambda: "a finite number >= 0",
    clip_bound: lambda: "a positive, finite number, or adaptive",
    fraction_between: lambda: "a number between 0 and 1, both excluded",
    dataset_name: lambda: f"one of {', '.join(dataset_names())}, or a path to a .npz file",
    model_spec: lambda: f"one of {', '.join(model_names())}, or module:function for your own",
    update_encoding: lambda: f"one of {importlib.import_module('comind.encodings').DESCRIPTION}, FRACTION above 0 "
                             f"and at most 1",
    str: lambda: "text"}

#: What an option's choices may be: the names themselves, or the function of their owner that gives them.
Choices = Sequence[str] | Callable[[], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its name (which gives its flag and variable), default, help, parser and choices."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    offers: Choices | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The values this option accepts, if it is a choice (asked of their owner now)."""
        if self.offers is None:
            return None
        return tuple(self.offers() if callable(self.offers) else self.offers)

    def convert(self, value: Any, source: str) -> Any:
        if not isinstance(value, str):  # already typed (from TF_CONFIG)
            return value
        choices = self.choices
        try:
            converted = self.parse(value)
        except ValueError:
            converted = None
        if converted is None or (choices and converted not in choices):
            expected = f"one of {', '.join(choices)}" if choices else _TYPE_NAMES.get(self.parse, lambda: "valid")()
            raise ValueError(f"{source} must be {expected}. Received: {source}={value!r}")
        return converted


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for option in options:
        shown = "unset" if option.default is None else option.default
        # A switch alone on the command line turns it on; it may also take a value (--secure-aggregation false).
        help = f"{option.help} [env {option.env}; default {shown}]"
        if option.parse is switch:
            parser.add_argument(option.flag, dest=option.name, default=None, metavar=option.name.upper(), help=help,
                                nargs="?", const="true")
        else:
            parser.add_argument(option.flag, dest=option.name, default=None, metavar=option.name.upper(), help=help)
