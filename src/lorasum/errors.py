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
