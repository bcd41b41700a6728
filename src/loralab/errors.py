"""The one exception type users see: what went wrong, where (file, record, field) and how to fix it."""

from __future__ import annotations


class LoralabError(Exception):
    """A user-facing error. The CLI prints it on one line, without a traceback (unless --debug).

    Example:
        raise LoralabError("r must be a positive integer, got 0", field="lora.r", fix="use r=8")
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        record: int | str | None = None,
        field: str | None = None,
        fix: str | None = None,
    ):
        self.message = message
        self.file = None if file is None else str(file)
        self.record = record
        self.field = field
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.record}" if self.record is not None else "")
        elif self.record is not None:
            where = f"record {self.record}"
        if self.field is not None:
            where = f"{where}: field '{self.field}'" if where else f"field '{self.field}'"
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text += f" (fix: {self.fix})"
        return text


def did_you_mean(name: str, choices, what: str = "one of", cutoff: float = 0.5) -> str:
    """A fix hint for a mistyped name: the closest choice if one is close, else the list of choices.

    Example:
        raise LoralabError(f"unknown adapter {name!r}", fix=did_you_mean(name, adapters))
    """
    import difflib

    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=cutoff)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"use {what} {', '.join(choices)}" if choices else "there is nothing to choose from"
