"""Plain-dict registries for models, encoders, losses and dataset formats."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from seglab.errors import SeglabError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(dict[str, T], Generic[T]):
    """A dict of named builders that refuses duplicate names and explains unknown ones.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("ce")
    ... def cross_entropy(...): ...
    >>> LOSSES.get_or_raise("cee", flag="--loss")
    SeglabError: --loss 'cee' is not a known loss (did you mean 'ce'?); choose one of: ce
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self[name] = obj
            return obj

        return add

    def get_or_raise(self, name: str, flag: str | None = None) -> T:
        if name in self:
            return self[name]
        where = f"{flag} " if flag else ""
        raise SeglabError(
            f"{where}'{name}' is not a known {self.kind}{did_you_mean(name, list(self))}; "
            f"choose one of: {', '.join(sorted(self))}"
        )
