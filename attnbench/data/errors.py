"""The one error data loading raises: one line naming the path and what was expected there."""


class DataError(ValueError):
    """A missing or malformed data root; the message names the path and the expected layout."""
