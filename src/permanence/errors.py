"""One exception type for bad input: its message is the single line a user sees."""


class PermanenceError(Exception):
    """Bad input (config, data file, name). The message names the field or file and what is allowed."""
