"""The one exception type users see: the CLI turns it into a one-line message and exit code 2."""

from __future__ import annotations


class LorasumError(Exception):
    """Bad input or a state lorasum refuses to work from; the message names the culprit and the fix.

    With `key`, the message is about one named value (`max_length`, `out`): it reads "KEY MESSAGE" in the library
    and "--KEY MESSAGE" where the value came from a command-line flag (see `as_flag`).
    """

    def __init__(self, message: str, key: str | None = None):
        self.key, self.message = key, message
        super().__init__(f"{key} {message}" if key else message)

    def as_flag(self) -> str:
        """The message with its key written as the command-line flag that sets it."""
        return f"--{self.key.replace('_', '-')} {self.message}" if self.key else self.message


class DivergedError(LorasumError):
    """Training whose loss left the finite numbers after updates: a verdict on the hyperparameters, so a search
    scores it as a failed point (a pruned trial) instead of stopping; everywhere else it is a LorasumError."""


SHOW_LIMIT = 60  # characters of a user's value quoted in a message


def show(value: object, limit: int = SHOW_LIMIT) -> str:
    """A bounded repr for messages: at most about `limit` characters, built without ever rendering the whole value,
    so a value with exponential structure (a YAML alias bomb) or a 10**4000 integer costs nothing to quote."""
    parts: list[str] = []
    budget = [limit]

    def put(text: str) -> bool:
        parts.append(text[:max(budget[0], 0)])
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(v: object, depth: int) -> bool:
        if depth > 8:
            return put("…")
        if isinstance(v, bool) or v is None:
            return put(repr(v))
        if isinstance(v, int):
            if v.bit_length() > 64:  # str() of a huge int is slow, and refused past 4300 digits
                return put(f"<an integer of about {int(v.bit_length() * 0.30103) + 1} digits>")
            return put(str(v))
        if isinstance(v, float):
            return put(repr(v))
        if isinstance(v, (str, bytes)):
            return put(repr(v[:budget[0] + 1]))
        if isinstance(v, dict):
            items: object = v.items()
            opening, closing = "{", "}"
        elif isinstance(v, (list, tuple, set, frozenset)):
            items, opening, closing = v, ("[" if isinstance(v, list) else "("), ("]" if isinstance(v, list) else ")")
        else:
            return put(f"<{type(v).__name__}>")
        if not put(opening):
            return False
        for i, item in enumerate(items):  # type: ignore[arg-type]
            if i and not put(", "):
                return False
            if isinstance(v, dict):
                k, x = item  # type: ignore[misc]
                if not (walk(k, depth + 1) and put(": ") and walk(x, depth + 1)):
                    return False
            elif not walk(item, depth + 1):
                return False
        return put(closing)

    if not walk(value, 0):
        return "".join(parts).rstrip() + "…"
    return "".join(parts)
