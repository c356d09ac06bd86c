"""The promptcache error hierarchy: every user mistake surfaces as one of these.

`PromptCacheError` is a `ValueError`, so callers that already catch bad input keep working.
"""

from __future__ import annotations


class PromptCacheError(ValueError):
    """Root of every error promptcache raises for a user's mistake or hostile input."""


class SchemaError(PromptCacheError):
    """A PML document (schema or prompt markup) is malformed or invalid.

    Carries the 1-based `line` and `column` of the culprit when known, and the `source`
    (file name or "<string>") so editors can jump to it.
    """

    def __init__(self, message: str, line: int | None = None, column: int | None = None,
                 source: str | None = None):
        self.message, self.line, self.column, self.source = message, line, column, source
        where = ""
        if line is not None:
            where = f"{source or '<string>'}:{line}" + (f":{column}" if column is not None else "") + ": "
        super().__init__(where + message)


class PromptError(PromptCacheError):
    """A prompt cannot be served: unknown schema/module/parameter, argument too long, too long for the model."""


class StoreError(PromptCacheError):
    """The module store was misused (bad budget, unknown key, directory problems)."""
