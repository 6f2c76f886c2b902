"""What a user error is: one base class, and how its message is shortened for one line.

Every problem a user can fix (a bad file, key, argument or combination of them) is raised as a
:class:`Med3DInsightError` (or a subclass: ``CheckpointError``, ``CacheError``, ``ConfigError``, ...), whose message
names the file or key and says what to do. The command line turns only these (and ``OSError`` on the user's paths)
into one line and exit code 2; anything else is a bug and keeps its traceback. ``MED3DINSIGHT_DEBUG=1`` re-raises
everything.

The class derives from :class:`ValueError`, so code that caught ``ValueError`` around the package's functions keeps
working.
"""
from __future__ import annotations

from typing import Any

__all__ = ["CheckpointError", "Med3DInsightError", "cut", "first_line", "short_repr"]


class Med3DInsightError(ValueError):
    """Bad user input; the message names the file, argument or key and the fix (its first line says it all)."""


class CheckpointError(Med3DInsightError):
    """A checkpoint file that cannot be read or used; the message names the file and what to do."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (details such as a load report may follow it), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages about values a user wrote.

    Containers are walked with a budget, so a value that is huge once expanded (YAML anchors nested a few levels deep
    describe gigabytes in a few hundred bytes) is never rendered in full.
    """
    out: list = []
    budget = [limit + 1]

    def emit(s: str) -> bool:
        out.append(s[:budget[0]])
        budget[0] -= len(s)
        return budget[0] > 0

    def walk(v: Any) -> bool:
        if isinstance(v, dict):
            if not emit("{"):
                return False
            for i, (k, x) in enumerate(v.items()):
                if (i and not emit(", ")) or not walk(k) or not emit(": ") or not walk(x):
                    return False
            return emit("}")
        if isinstance(v, (list, tuple)):
            if not emit("[" if isinstance(v, list) else "("):
                return False
            for i, x in enumerate(v):
                if (i and not emit(", ")) or not walk(x):
                    return False
            return emit("]" if isinstance(v, list) else ")")
        return emit(repr(v))

    walk(value)
    return cut("".join(out), limit)


def cut(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (``...`` marking the cut), for one-line messages."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."
