"""User-facing errors.

`OneGenError` marks a problem with the user's input (a file, a config key, a model directory).
The CLI prints it as one line and exits non-zero, with no traceback. Anything else is a bug.
"""

from __future__ import annotations

MAX_MESSAGE = 600  # characters: a message that quotes a 10 MB value still prints as one short line


class OneGenError(Exception):
    """A user error: bad input, with where it is and how to fix it.

    Args:
        message: what is wrong and what to do about it.
        file: the file it came from, if any.
        line: 1-based line number in that file, if any.
        field: the JSON field or config key at fault, if any.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file) + (f":{self.line}" if self.line is not None else "")
        if self.field is not None:
            where = f"{where} field '{self.field}'" if where else f"field '{self.field}'"
        text = " ".join(self.message.split())
        if len(text) > MAX_MESSAGE:  # keep the start (what is wrong) and the end (what to do)
            text = f"{text[:MAX_MESSAGE * 2 // 3]} [... {len(text) - MAX_MESSAGE} characters ...] " \
                   f"{text[-MAX_MESSAGE // 3:]}"
        return f"{where}: {text}" if where else text
