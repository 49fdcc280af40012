"""The one error of weight loading, and how it lists keys."""

from __future__ import annotations

from ...base import EngineError

LISTED = 20  # keys named in an error message before "... and N more"


class WeightsError(EngineError):
    """Weights that cannot be read or do not fit the model; the message says which and why."""


def listing(keys: list[str]) -> str:
    shown = "\n    " + "\n    ".join(keys[:LISTED])
    return shown + (f"\n    ... and {len(keys) - LISTED} more" if len(keys) > LISTED else "")
