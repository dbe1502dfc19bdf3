"""Named choices for each stage of a round: one registry per stage, owned by the stage's module.

A new algorithm is a function or a small class plus one ``register`` line;
the command line, compose, the chart's values and its schema take their
lists of choices from these registries (``tests/test_registries.py`` checks
that they agree).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Choices by name, in the order they were registered (the first is the default).

    Args:
        setting: the ``COMIND_*`` setting that picks a choice, named in errors.
    """

    def __init__(self, setting: str):
        self.setting = setting
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that registers what it decorates under ``name``."""
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.setting} already has a choice named {name!r}.")
            self._entries[name] = entry
            return entry
        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"{self.setting} must be one of {', '.join(self._entries)}. "
                             f"Received: {self.setting}={name!r}") from None
