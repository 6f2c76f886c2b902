"""A resumable JSONL store of slice captions, one JSON object per line, with the settings that produced them.

Each line is ``{"case": str, "plane": "axial"|"coronal"|"sagittal", "index": int, "position": float, "text": str,
...extra}``; a record is identified by :func:`caption_key`. Batches are appended with one write followed by
``fsync``, so an interruption loses at most the batch being written; a torn last line (no trailing newline: a crash
mid-write) counts as not written and is cut off when the file is next opened for appending. The settings live in the
sidecar ``<path>.meta.json`` (the settings dict itself, so readers can look up e.g. ``meta["model"]``) and a resume
with other settings is refused, so one file never mixes two models' captions.

Sharded runs (``torchrun``, :func:`~.captioner.caption_dataset`) append to one file per process in the folder
``<path>.shards/`` (:func:`shard_path`), each a caption file of its own; :func:`merge_shards` folds them into
``<path>`` in the canonical order of :func:`record_order` (rewritten under a temporary name and renamed), so the
merged bytes do not depend on the number of processes. Until then, :func:`read_all` reads ``<path>`` and its shards
together (what a resumed run skips). Identical records in several files are merged silently; a shard that holds
another caption for a key, or a case that is not in the dataset, is refused with one line naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from ..errors import Med3DInsightError, cut
from ..fileio import atomic_write, atomic_write_text, diff_keys
from ..planes import PLANES
from ..runlock import RunLock
from ..slices import slice_key

PathLike = Union[str, os.PathLike]
_REQUIRED = {"case": str, "plane": str, "index": int, "position": (int, float), "text": str}


class CaptionError(Med3DInsightError):
    """A caption file that cannot be read or resumed; the message names the file, the line and the fix."""


caption_key = slice_key  # a caption record is keyed like its slice


def caption_lock(path: PathLike) -> RunLock:
    """The lock a caption run holds on its output ``path`` while it reads and writes it: ``<path>.lock`` beside it
    (:meth:`~med3dinsight_plugin.runlock.RunLock.beside`). A second run on the same file fails at once with
    :class:`~med3dinsight_plugin.runlock.RunLockedError`, naming the lock file and the holder's pid; folders created
    for the lock are removed again if the run leaves them empty. Re-entrant within one process."""
    return RunLock.beside(path, what=f"the caption file {path}")


def _check_record(rec) -> Optional[str]:
    """Why ``rec`` is not a valid caption record, or None."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    for field, kind in _REQUIRED.items():
        if field not in rec:
            return f"missing field {field!r}"
        if isinstance(rec[field], bool) or not isinstance(rec[field], kind):
            return f"field {field!r} is {type(rec[field]).__name__}"
    if rec["plane"] not in PLANES:
        return f"unknown plane {rec['plane']!r}"
    return None


def _complete_length(path: Path) -> int:
    """Byte length of ``path`` up to and including its last newline (the part a crash cannot have torn)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:  # scan backwards in chunks: the file may hold many MB of captions
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return pos - step + nl + 1
            pos -= step
    return 0


def _canonical(settings: dict, what: str) -> dict:
    """``settings`` as it reads back from JSON (tuples become lists), so stored and given settings compare equal."""
    if not isinstance(settings, dict):
        raise CaptionError(f"caption settings must be a dict, got {type(settings).__name__}")
    try:
        return json.loads(json.dumps(settings, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise CaptionError(f"settings for {what} must be JSON-serialisable: {e}") from None


def _dotted(d: dict, key: str):
    """The value at a dotted key of a nested dict (None where missing)."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _short(value, n: int = 60) -> str:
    return cut(json.dumps(value, sort_keys=True), n)


class CaptionFile:
    """Append-only caption store at ``path`` with its settings sidecar ``<path>.meta.json``.

    Use as a context manager to append: ``with CaptionFile(p) as f: f.write(records)``.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self._file = None

    # ----------------------------------------------------------------------------------------------------- reading
    @staticmethod
    def read(path: PathLike, strict: bool = True) -> dict:
        """Records of the caption file at ``path`` (empty if it does not exist), keyed by :func:`caption_key`.

        A last line without a trailing newline is a write torn by a crash and is ignored.

        Args:
            path: the ``.jsonl`` file.
            strict: raise :class:`CaptionError` on a malformed line or a duplicate key; when False, skip malformed
                lines and keep the first of duplicate records.

        Returns:
            dict mapping key -> record, in file order.
        """
        path = Path(path)
        if not path.exists():
            return {}
        records, first_line = {}, {}
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # torn final line
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    problem = _check_record(rec)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    problem = f"not JSON: {e}"
                if problem is not None:
                    if strict:
                        raise CaptionError(f"{path} line {lineno}: malformed caption record ({problem}); "
                                           f"fix or delete that line, and rerun to caption it again")
                    continue
                key = caption_key(rec["case"], rec["plane"], rec["position"])
                if key in records:
                    if strict:
                        raise CaptionError(f"{path} line {lineno}: duplicate caption key {key!r} (first on line "
                                           f"{first_line[key]}); delete one of the two lines")
                    continue
                records[key], first_line[key] = rec, lineno
        return records

    # ---------------------------------------------------------------------------------------------------- settings
    def check_settings(self, settings: dict, also: Iterable[PathLike] = (), ignore: Iterable[str] = ()) -> None:
        """Record ``settings`` in the sidecar, or refuse if the existing captions were written with other ones.

        Args:
            settings: JSON-serialisable dict (model id, prompts, rendering / slice settings, ...).
            also: other files whose captions count as this file's (the shards of a sharded run).
            ignore: top-level keys left out of the comparison (ones the caller checks itself, such as the label
                files' fingerprints of :func:`~.label_captions.caption_from_labels`); a new sidecar holds them.

        Raises:
            CaptionError: the file (or one of ``also``) holds captions and the sidecar is missing, unreadable or
                differs.
        """
        given = _canonical(settings, str(self.path))
        has_records = any(p.is_file() and _complete_length(p) > 0 for p in (self.path, *map(Path, also)))
        if has_records:
            stored = self.stored_settings()
            if stored is None:
                raise CaptionError(f"{self.path} (or its shards) holds captions but no settings file "
                                   f"{self.meta_path.name}, so a resume cannot be checked; restore that file or use a "
                                   f"new output file")
            skip = set(ignore)
            stored = {k: v for k, v in stored.items() if k not in skip}
            given = {k: v for k, v in given.items() if k not in skip}
            if stored == given:
                return
            keys = diff_keys(stored, given)
            shown = "; ".join(f"{k} {_short(_dotted(stored, k))} vs {_short(_dotted(given, k))}" for k in keys[:3])
            raise CaptionError(f"{self.path.name} was written with other settings ({shown}; differing keys: "
                               f"{', '.join(keys)}); use a new output file or pass the same settings")
        # No captions yet: (re)write the sidecar atomically, so it is never half-written.
        self.record_settings(given)

    def stored_settings(self) -> Optional[dict]:
        """The settings in the sidecar, or None if there is none.

        Raises:
            CaptionError: the sidecar cannot be read or is not a JSON object.
        """
        if not self.meta_path.exists():
            return None
        try:
            stored = json.loads(self.meta_path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise CaptionError(f"cannot read {self.meta_path} ({e}); restore it or use a new output file") from None
        return stored

    def record_settings(self, settings: dict) -> None:
        """Write ``settings`` to the sidecar (atomically), whatever it held: for callers that checked the captions
        against them (:meth:`check_settings` refuses other settings once there are captions)."""
        given = _canonical(settings, str(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.meta_path, json.dumps(given, indent=1, sort_keys=True))

    def drop_cases(self, cases: Iterable[str]) -> int:
        """Rewrite the file without the records of ``cases`` (under a temporary name, then renamed: a crash leaves
        the old file); the other lines keep their bytes and order, a torn last line goes.

        Returns:
            the number of records removed.
        """
        if self._file is not None:
            raise CaptionError(f"{self.path} is open for appending; close it before removing records")
        cases = set(cases)
        if not cases or not self.path.exists():
            return 0
        kept, dropped = [], 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn final line
                try:
                    case = json.loads(raw.decode("utf-8")).get("case")
                except (UnicodeDecodeError, ValueError, AttributeError):
                    case = None  # malformed: kept for read() to report
                if case in cases:
                    dropped += 1
                else:
                    kept.append(raw)
        if dropped:
            data = b"".join(kept)
            atomic_write(self.path, lambda tmp: Path(tmp).write_bytes(data))
        return dropped

    # --------------------------------------------------------------------------------------------------- appending
    def open(self) -> "CaptionFile":
        """Open for appending (creating the file), first cutting off a torn last line. Returns self."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
            keep = _complete_length(self.path)
            if self._file.tell() != keep:
                self._file.truncate(keep)
                self._file.seek(keep)
        return self

    def write(self, records: Iterable[dict]) -> int:
        """Append ``records`` as complete lines in one write, then flush and fsync so they survive a crash.

        Args:
            records: dicts with at least case, plane, index, position and text.

        Returns:
            the number of records written.
        """
        if self._file is None:
            raise CaptionError(f"{self.path} is not open for appending; use `with CaptionFile(path) as f:`")
        lines = []
        for rec in records:
            problem = _check_record(rec)
            if problem is not None:
                raise CaptionError(f"refusing to write a malformed caption record to {self.path}: {problem}")
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if lines:
            self._file.write("".join(lines).encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
        return len(lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "CaptionFile":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------ shards

def shard_folder(path: PathLike) -> Path:
    """The folder of the per-process shard files of the caption file ``path``: ``<path>.shards``."""
    return Path(f"{path}.shards")


def shard_path(path: PathLike, rank: int, world: int) -> Path:
    """The shard file process ``rank`` of ``world`` appends to: ``<path>.shards/rank-RRRRR-of-WWWWW.jsonl``."""
    return shard_folder(path) / f"rank-{rank:05d}-of-{world:05d}.jsonl"


def shard_files(path: PathLike) -> List[Path]:
    """The shard files left next to ``path`` (by runs with any number of processes), sorted by name."""
    folder = shard_folder(path)
    if folder.exists() and not folder.is_dir():
        raise CaptionError(f"{folder} is a file, but sharded captioning keeps its per-process files in a folder of "
                           f"that name; move that file away or choose another output file")
    return sorted(folder.glob("rank-*-of-*.jsonl")) if folder.is_dir() else []


def record_order(rec: dict) -> tuple:
    """The canonical order of caption records: case, plane (axial, coronal, sagittal), position, index."""
    return rec["case"], PLANES.index(rec["plane"]), float(rec["position"]), rec["index"]


def read_all(path: PathLike, cases: Optional[Iterable[str]] = None) -> Dict[str, dict]:
    """The records of the caption file ``path`` and of its shard files, keyed by :func:`caption_key`.

    Each file is read like :meth:`CaptionFile.read` (strict: a malformed line or a key twice in one file names the
    file and line; a torn last line is ignored). A key in several files with the same record counts once (a crash
    between a merge and the removal of the shards leaves the same records twice).

    Args:
        path: the caption file.
        cases: the dataset's cases; given, a shard that holds another case is refused.

    Raises:
        CaptionError: a shard holds another record for a key than the caption file or an earlier shard, or (with
            ``cases``) a case that is not in the dataset; the message names the shard and the fix.
    """
    records: Dict[str, dict] = {}
    origin: Dict[str, Path] = {}
    known = None if cases is None else set(cases)
    for part in (Path(path), *shard_files(path)):
        is_shard = part != Path(path)
        conflicts = []
        for key, rec in CaptionFile.read(part).items():
            if is_shard and known is not None and rec["case"] not in known:
                raise CaptionError(f"the shard {part} holds captions of case {rec['case']!r}, which is not in the "
                                   f"dataset (left by a run on another dataset?); delete that shard file, or caption "
                                   f"that dataset into another -o/--output")
            if key not in records:
                records[key], origin[key] = rec, part
            elif records[key] != rec:
                conflicts.append(key)
        if conflicts:
            other = origin[conflicts[0]]
            more = f" (and {len(conflicts) - 1} other slice(s))" if len(conflicts) > 1 else ""
            raise CaptionError(f"the shard {part} holds another caption for {conflicts[0]!r}{more} than {other}; "
                               f"delete that shard file to caption its slices again, and rerun")
    return records


def merge_shards(path: PathLike, cases: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """Fold the shard files of ``path`` into ``path``, in the order of :func:`record_order`, then remove them.

    The merged file is written whole under a temporary name and renamed over ``path``, so a crash leaves the old file
    and the shards (a rerun merges again), never a half-written file; the shards are removed only after the rename.
    Without shard files, ``path`` is left as it is. Shards that disagree with each other or with ``path``, or (with
    ``cases``) hold a case that is not in the dataset, are refused and nothing is merged (:func:`read_all`).

    Returns:
        ``{"records": records in path now, "shards": shard files merged}``.
    """
    path = Path(path)
    parts = shard_files(path)
    if not parts:
        if shard_folder(path).is_dir():
            _remove_folder(shard_folder(path))
        return {"records": len(CaptionFile.read(path)), "shards": 0}
    records = read_all(path, cases)
    data = "".join(json.dumps(rec, ensure_ascii=False) + "\n"
                   for rec in sorted(records.values(), key=record_order)).encode("utf-8")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    for part in parts:
        part.unlink()
    _remove_folder(shard_folder(path))
    return {"records": len(records), "shards": len(parts)}


def _remove_folder(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # something else was put there: leave it
        pass
