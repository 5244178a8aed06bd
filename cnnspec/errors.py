"""Problems found in a spec, reported as ``FILE:LINE:COL: error: WHAT`` plus a hint."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    message: str
    line: int = 0  # 1-based; 0 when unknown
    col: int = 0
    hint: str = ""
    severity: str = "error"  # "error" or "warning"
    file: str = ""
    path: tuple = ()  # document path, when known: lets later stages skip broken layers

    def format(self, file: str | None = None) -> str:
        where = file if file is not None else (self.file or "<spec>")
        if self.line:
            where += f":{self.line}:{self.col}"
        text = f"{where}: {self.severity}: {self.message}"
        if self.hint:
            text += f"\n  = help: {self.hint}"
        return text

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.col,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


@dataclass
class SpecError(Exception):
    """Raised with every problem found, never only the first."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(p.format() for p in self.problems)


class LayerError(Exception):
    """A semantic problem of one layer; `attr` names the attribute to point at."""

    def __init__(self, message: str, attr: str | None = None, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.attr = attr
        self.hint = hint


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""
