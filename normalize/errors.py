"""The one error normalizers raise: the input cannot become an InboundMessage."""

from __future__ import annotations

from typing import Any, TypeVar


class NormalizeError(ValueError):
    """``reason`` is machine-readable (``no-sender``, ``no-identity``); ``detail`` for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Pickled from a parse process back to the server: without this the round
        # trip called __init__ with one argument, failed, and the dead letter said
        # "normalizer-error" instead of the reason (attacker review, 2026-11-30). Its
        # state, not __init__, rebuilds it: a subclass may take other arguments.
        return (rebuilt, (type(self), self.args, self.__dict__))


E = TypeVar("E", bound=BaseException)


def rebuilt(cls: type[E], args: tuple[object, ...], state: dict[str, Any]) -> E:
    """An exception as it was pickled, without calling its ``__init__`` (a subclass
    may take other arguments than its base)."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error
