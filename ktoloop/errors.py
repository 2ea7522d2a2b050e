"""One base class for expected failures: the CLI prints their message (which names the field, file,
offset or address at fault) without a traceback and exits 2."""


class KtoLoopError(Exception):
    """An expected, explained failure."""


class TransientError(KtoLoopError):
    """Worth retrying later (broker unavailable, DuckDB file locked): flows retry these, never bad data."""
