"""The base of the typed results that the pipeline functions return (``caption_dataset``, ``caption_from_labels``,
``embed_dataset``, ``pretrain`` / ``run_pretraining``, ``export_checkpoint``, ``attach_checkpoint``).

Each result is a frozen dataclass defined next to its function, with its fields documented there; read them as
attributes (``result.checkpoint``). :meth:`Result.to_dict` gives plain JSON-ready values for printing or saving.
These functions used to return dicts: ``result["key"]``, ``result.get("key")`` and ``"key" in result`` still work
for one more release and warn with a :class:`DeprecationWarning`.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict

__all__ = ["Result"]


class Result:
    """Mixin of the result dataclasses: :meth:`to_dict`, and the deprecated dict-style access of the old dicts."""

    __slots__ = ()
    __iter__ = None  # not a mapping: iterating must not fall back to __getitem__(0), __getitem__(1), ...

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain values (nested results and reports through their own ``to_dict``, paths as
        strings), ready for ``json.dumps``."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self._field_names():
            raise KeyError(key)
        self._warn(f"[{key!r}]", key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated: the field ``key`` (``default`` if there is none); read the attribute instead."""
        self._warn(f".get({key!r})", key)
        return getattr(self, key) if isinstance(key, str) and key in self._field_names() else default

    def __contains__(self, key: Any) -> bool:
        self._warn(f"{key!r} in ...", key)
        return isinstance(key, str) and key in self._field_names()

    def _field_names(self):
        return {f.name for f in dataclasses.fields(self)}

    def _warn(self, access: str, key: Any) -> None:
        name = type(self).__name__
        warnings.warn(f"indexing a {name} like a dict ({access}) is deprecated and will be removed; read the "
                      f"attribute (.{key}) or use .to_dict()", DeprecationWarning, stacklevel=3)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
