"""The two errors of the data pipeline: data that cannot be read at all, and one damaged sample."""


class DataError(RuntimeError):
    """The data cannot be read at all; the message names what and says what to do."""


class DamagedSample(ValueError):
    """One sample cannot be used; it is skipped and counted."""
