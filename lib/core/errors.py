"""The one exception type for everything a user can fix by changing params or inputs.

Stages show a `UserError` as one line (exit status 2) and let every other exception keep its
traceback, so a bug never hides behind a tidy message. Raise it (or a subclass) where the cause
is a value the user chose: a params key, an input file, a model name. Library errors a user can
cause (a file not found, a layer that does not exist, weights unavailable offline) are converted
to it at the boundary where the params key is known (`user_error_for`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class UserError(ValueError):
    """A problem the user can fix. `key` is the dotted params key (e.g. ``circles.grid``) when there is one.

    A ValueError, so library callers that validate arguments may catch both alike; only the stage
    commands treat it specially (one line, no traceback).
    """

    def __init__(self, message: str, *, key: str | None = None, value: Any = None, fix: str | None = None) -> None:
        self.message = message
        self.key = key
        self.value = value
        self.fix = fix
        super().__init__(self.format())

    def format(self) -> str:
        """`key: value — message; fix` on one line (the parts that are known)."""
        head = ""
        if self.key is not None:
            head = f"{self.key}: {self.value!r} — " if self.value is not None else f"{self.key}: "
        text = f"{head}{self.message}"
        return f"{text}; {self.fix}" if self.fix else text


@contextmanager
def user_error_for(
    key: str,
    value: Any = None,
    *,
    catch: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
    fix: str | None = None,
) -> Iterator[None]:
    """Re-raise `catch` errors of the block as a `UserError` naming the params `key` (and `value`).

    Use only around code whose errors of those types can come from that value alone; a
    `UserError` raised inside keeps its own key when it has one.
    """
    try:
        yield
    except UserError as exc:
        if exc.key is None:
            raise UserError(exc.message, key=key, value=value, fix=exc.fix or fix) from exc
        raise
    except catch as exc:
        message = exc.strerror + f": {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(message, key=key, value=value, fix=fix) from exc
