"""The one exception type users see: the CLI turns it into a one-line message and exit code 2."""


class LorasumError(Exception):
    """Bad input or a state lorasum refuses to work from; the message names the culprit and the fix."""
