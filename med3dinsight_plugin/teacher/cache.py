"""The on-disk teacher cache: per-slice image and text embeddings, computed once, read memory-mapped in training.

Layout of a cache folder::

    manifest.json                 settings (teacher, rendering, slice policy, captions, source), shards, cases
    shard-00000.safetensors       rows of (plane, index, position, case) + image/text embeddings (float16)
    ...

A shard holds the slices of a fixed run of cases (``cases_per_shard`` consecutive sorted case ids), so the shard
files do not depend on how many processes wrote them. Each shard is written whole to a temporary name and renamed;
its header repeats the settings hash, so a resumed run keeps the shards that match and a stale one is refused.
Training reads the embeddings through ``numpy.memmap`` of the safetensors data, so worker processes share pages.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..checkpoint import atomic_write
from ..errors import Med3DInsightError

__all__ = ["CacheError", "CaseEntries", "StaleCacheError", "TeacherCache", "settings_hash", "shard_name",
           "verify_cache", "write_manifest", "write_shard"]

FORMAT = "med3dinsight-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64,
           "U8": np.uint8, "I8": np.int8}


class CacheError(Med3DInsightError):
    """A teacher cache that cannot be used; the message names the folder or shard and what to do."""


class StaleCacheError(CacheError):
    """A cache made with other settings (teacher, rendering, slices, captions or volumes)."""


def settings_hash(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.safetensors"


def diff_keys(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def write_shard(folder: Path, shard_id: int, cases: Sequence[str], shapes: Dict[str, Sequence[int]],
                rows: Dict[str, np.ndarray], settings_digest: str) -> Path:
    """Write one shard atomically.

    Args:
        rows: ``plane`` (N,) uint8, ``index`` (N,) int32, ``position`` (N,) float32, ``case`` (N,) int32 (index into
            ``cases``), ``image`` (N, E) and optionally ``text`` (N, E) embeddings (stored as float16).
    """
    from safetensors.numpy import save_file

    tensors = {"plane": rows["plane"].astype(np.uint8), "index": rows["index"].astype(np.int32),
               "position": rows["position"].astype(np.float32), "case": rows["case"].astype(np.int32),
               "image": rows["image"].astype(np.float16)}
    if rows.get("text") is not None:
        tensors["text"] = rows["text"].astype(np.float16)
    # one metadata key: safetensors keeps metadata in a hash map, so several keys come out in varying order and
    # identical shards would differ byte-wise
    meta = {"med3dinsight": json.dumps({"format": FORMAT, "settings": settings_digest, "cases": list(cases),
                                        "shapes": {c: list(shapes[c]) for c in cases}})}
    path = Path(folder) / shard_name(shard_id)
    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, meta))
    return path


def _read_header(path: Path):
    """safetensors header -> (metadata, {name: (dtype, shape, absolute byte offset)}); raises CacheError."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, struct.error, ValueError) as e:
        raise CacheError(f"cannot read {path} ({e}); delete it and rerun med3dinsight embed to rewrite it") from None
    try:
        meta = json.loads((header.pop("__metadata__", {}) or {}).get("med3dinsight", "{}"))
    except ValueError:
        meta = {}
    entries = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES or 8 + n + end > size:
            raise CacheError(f"{path} is truncated or damaged (tensor {name}); delete it and rerun med3dinsight embed")
        entries[name] = (_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin)
    return meta, entries


def _memmap(path: Path, entry) -> np.ndarray:
    dtype, shape, offset = entry
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def shard_settings(path: Path) -> Optional[str]:
    """The settings hash a shard was written with (``None`` if unreadable)."""
    try:
        return _read_header(path)[0].get("settings")
    except CacheError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, settings: Dict[str, Any], shard_cases: Dict[int, List[str]]) -> Path:
    """Describe the finished cache: every shard (rows, sha256) and every case (shape, shard)."""
    folder = Path(folder)
    shards, cases = [], {}
    for sid in sorted(shard_cases):
        path = folder / shard_name(sid)
        meta, entries = _read_header(path)
        shapes = meta["shapes"]
        shards.append({"file": path.name, "rows": entries["plane"][1][0], "cases": len(shard_cases[sid]),
                       "sha256": _sha256(path)})
        for c in shard_cases[sid]:
            cases[c] = {"shard": path.name, "shape": shapes[c]}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings,
                "settings_hash": settings_hash(settings), "shards": shards, "cases": cases}
    out = folder / MANIFEST
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return out


def read_manifest(folder: Path) -> Dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{folder} is not a finished teacher cache (no {MANIFEST}); run med3dinsight embed "
                         f"(it resumes where it stopped)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"cannot read {path} ({e}); rerun med3dinsight embed into a new folder") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a med3dinsight teacher cache manifest")
    return manifest


@dataclass
class CaseEntries:
    """The cached slices of one case (views into the memory-mapped shard)."""

    plane: np.ndarray  # (n,) uint8
    index: np.ndarray  # (n,) int32, slice index along the plane's canonical axis
    position: np.ndarray  # (n,) float32
    image: np.ndarray  # (n, E) float16
    text: Optional[np.ndarray]  # (n, E) float16 or None
    shape: tuple  # canonical (D, H, W) of the volume the slices were taken from


class TeacherCache:
    """A finished cache, opened for training (memory-mapped; no 2D model is touched).

    Args:
        folder: the cache folder.
        expect: settings the caller needs (e.g. ``{"teacher": {...}, "source": {...}}``); any difference raises
            :class:`StaleCacheError` naming the differing keys.
    """

    def __init__(self, folder, expect: Optional[Dict[str, Any]] = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.settings = self.manifest["settings"]
        if expect:
            self.check(expect)
        self._cases: Dict[str, CaseEntries] = {}
        for shard in self.manifest["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise CacheError(f"{path} is missing; rerun med3dinsight embed with the same settings to rewrite it")
            meta, entries = _read_header(path)
            if meta.get("settings") != self.manifest["settings_hash"]:
                raise StaleCacheError(f"{path} was written with other settings than {self.folder / MANIFEST}; "
                                      f"rerun med3dinsight embed into a new folder")
            arrays = {k: _memmap(path, e) for k, e in entries.items()}
            case_ids, shapes = meta["cases"], meta["shapes"]
            order = np.asarray(arrays["case"])
            for i, case in enumerate(case_ids):
                rows = np.flatnonzero(order == i)
                lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
                text = arrays.get("text")
                self._cases[case] = CaseEntries(np.asarray(arrays["plane"][lo:hi]), np.asarray(arrays["index"][lo:hi]),
                                                np.asarray(arrays["position"][lo:hi]), arrays["image"][lo:hi],
                                                None if text is None else text[lo:hi], tuple(shapes[case]))

    @property
    def cases(self) -> List[str]:
        return sorted(self._cases)

    @property
    def embed_dim(self) -> int:
        return int(self.settings["teacher"]["embed_dim"])

    @property
    def has_text(self) -> bool:
        return self.settings.get("captions") is not None

    def check(self, expect: Dict[str, Any]) -> None:
        """Raise :class:`StaleCacheError` unless the cache's settings contain ``expect``."""
        def restrict(actual, wanted):  # compare only what the caller asks about, at every level
            if isinstance(actual, dict) and isinstance(wanted, dict):
                return {k: restrict(actual.get(k), v) for k, v in wanted.items()}
            return actual
        differing = diff_keys(restrict(self.settings, expect), expect)
        if differing:
            shown = ", ".join(differing[:4]) + (" ..." if len(differing) > 4 else "")
            raise StaleCacheError(f"the teacher cache {self.folder} was made with other settings ({shown} differ); "
                                  f"rerun med3dinsight embed into a new folder with the current settings")

    def __contains__(self, case: str) -> bool:
        return case in self._cases

    def entries(self, case: str) -> CaseEntries:
        """The cached slices of ``case``; a case the cache lacks raises :class:`CacheError`."""
        if case not in self._cases:
            raise CacheError(f"the teacher cache {self.folder} has no slices of case {case!r}; rerun med3dinsight "
                             f"embed on the current dataset (it adds what is missing)")
        return self._cases[case]


def verify_cache(folder) -> List[str]:
    """Check every shard of a cache: present, checksum, readable, consistent rows, finite unit-norm embeddings.

    Returns:
        One line per problem found (empty when the cache is sound).
    """
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except CacheError as e:
        return [str(e)]
    problems = []
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if _sha256(path) != shard["sha256"]:
            problems.append(f"{path}: checksum mismatch (the file changed or is corrupt); delete it and rerun "
                            f"med3dinsight embed with the same settings")
            continue
        try:
            meta, entries = _read_header(path)
        except CacheError as e:
            problems.append(str(e))
            continue
        n = entries["plane"][1][0]
        for name in ("index", "position", "case", "image", "text"):
            if name in entries and entries[name][1][0] != n:
                problems.append(f"{path}: {name} has {entries[name][1][0]} rows, expected {n}")
        for name in ("image", "text"):
            if name in entries:
                emb = np.asarray(_memmap(path, entries[name]), dtype=np.float32)
                norms = np.linalg.norm(emb, axis=-1) if emb.size else np.ones(0)
                if not np.isfinite(emb).all() or np.abs(norms - 1).max(initial=0) > 1e-2:
                    problems.append(f"{path}: {name} embeddings are not finite unit vectors")
        if meta.get("settings") != manifest["settings_hash"]:
            problems.append(f"{path}: written with other settings than the manifest")
    return problems
