"""The on-disk teacher cache: per-slice image and text embeddings, computed once, read memory-mapped in training.

Layout of a cache folder::

    manifest.json                 settings (teacher, rendering, slice policy, captions, source), shards (rows,
                                  bytes, sha256), cases (shape, shard, volume fingerprint)
    shard-00000.safetensors       rows of (plane, index, position, case) + image/text embeddings (float16),
                                  optionally image_map: each slice's spatial feature map (N, C, S, S) float16
    ...

The image embeddings are ``embed_dim`` wide; the text embeddings ``text_dim`` wide, which differs when the image and
text targets come from different models (``shared_space`` false in the teacher identity, e.g. a timm image model with
a sentence encoder). Feature maps (``settings["feature_maps"]`` = S) lie on the slice's two canonical in-plane axes in
increasing axis order: ``image_map[n, :, i, j]`` is the feature at fractions ``((i + 0.5) / S, (j + 0.5) / S)`` of
the volume (see :func:`med3dinsight_plugin.slices.feature_map_grid`).

A shard holds the slices of a fixed run of cases (``cases_per_shard`` consecutive sorted case ids), so the shard
files do not depend on how many processes wrote them. Each shard is written whole to a temporary name and renamed;
its header repeats the settings hash, so a resumed run keeps the shards that match and a stale one is refused.
Training reads the embeddings through ``numpy.memmap`` of the safetensors data, so worker processes share pages.
Opening a cache checks each shard cheaply (size, header, layout, row metadata) and the first read of a case
checks its embeddings are finite unit vectors, so damage is refused rather than trained on; ``verify_cache``
compares the full checksums.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import Med3DInsightError, first_line, short_repr
from ..fileio import atomic_write, diff_keys, sha256_file

__all__ = ["CacheError", "CaseEntries", "StaleCacheError", "TeacherCache", "settings_hash", "shard_name",
           "verify_cache", "write_manifest", "write_shard"]

FORMAT = "med3dinsight-teacher-cache"
# 2: per-case volume fingerprints and shard sizes (1 is still read, without those checks); 3: optional image_map
# tensor and text targets in a space (and width) of their own. A cache that uses neither is written as 2, so that
# older readers still take it; 1 and 2 are still read (no maps, one shared space).
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors\Z")
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is damage, not data
_VERIFY_HINT = "run med3dinsight cache verify on the cache, then delete the shard and rerun med3dinsight embed with " \
               "the same settings to rewrite it"
_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64,
           "U8": np.uint8, "I8": np.int8}


class CacheError(Med3DInsightError):
    """A teacher cache that cannot be used; the message names the folder or shard and what to do."""


class StaleCacheError(CacheError):
    """A cache made with other settings (teacher, rendering, slices, captions or volumes)."""


def format_version_for(settings: Dict[str, Any]) -> int:
    """The format version a cache with these settings is written as: 3 with feature maps or text targets that do
    not share the image space, else 2 (readable by releases that predate version 3)."""
    teacher = settings.get("teacher") or {}
    new = settings.get("feature_maps") is not None or teacher.get("shared_space") is False or \
        teacher.get("text_dim", teacher.get("embed_dim")) != teacher.get("embed_dim")
    return FORMAT_VERSION if new else 2


def settings_hash(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.safetensors"



def write_shard(folder: Path, shard_id: int, cases: Sequence[str], shapes: Dict[str, Sequence[int]],
                rows: Dict[str, np.ndarray], settings_digest: str,
                fingerprints: Optional[Dict[str, str]] = None, format_version: Optional[int] = None) -> Path:
    """Write one shard atomically.

    Args:
        fingerprints: :meth:`~med3dinsight_plugin.volumes.Volume.fingerprint` of each case's volume.
        format_version: :func:`format_version_for` the cache's settings (default: 3 with feature maps, else 2).
        rows: ``plane`` (N,) uint8, ``index`` (N,) int32, ``position`` (N,) float32, ``case`` (N,) int32 (index into
            ``cases``), ``image`` (N, E) and optionally ``text`` (N, T) embeddings and ``image_map`` (N, C, S, S)
            feature maps (all stored as float16).
    """
    from safetensors.numpy import save_file

    tensors = {"plane": rows["plane"].astype(np.uint8), "index": rows["index"].astype(np.int32),
               "position": rows["position"].astype(np.float32), "case": rows["case"].astype(np.int32),
               "image": rows["image"].astype(np.float16)}
    if rows.get("text") is not None:
        tensors["text"] = rows["text"].astype(np.float16)
    if rows.get("image_map") is not None:
        tensors["image_map"] = rows["image_map"].astype(np.float16)
    # one metadata key: safetensors keeps metadata in a hash map, so several keys come out in varying order and
    # identical shards would differ byte-wise
    if format_version is None:
        format_version = FORMAT_VERSION if "image_map" in tensors else 2
    info = {"format": FORMAT, "format_version": format_version, "settings": settings_digest, "cases": list(cases),
            "shapes": {c: list(shapes[c]) for c in cases}}
    if fingerprints is not None:
        info["fingerprints"] = {c: fingerprints[c] for c in cases}
    meta = {"med3dinsight": json.dumps(info)}
    path = Path(folder) / shard_name(shard_id)
    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, meta))
    return path


def _damaged(path: Path, what: str) -> CacheError:
    return CacheError(f"{path} is damaged ({what}); {_VERIFY_HINT}")


def _read_header(path: Path):
    """safetensors header -> (metadata, {name: (dtype, shape, absolute byte offset)}), checked against the file.

    Nothing is read beyond the header, and its claimed length is checked against the file first, so a flipped bit
    in the length cannot make this allocate gigabytes. Raises :class:`CacheError` naming the shard.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= min(size - 8, _MAX_HEADER):
                raise _damaged(path, f"its header claims {n} bytes, the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise CacheError(f"cannot read {path} ({e.strerror or e}); {_VERIFY_HINT}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise _damaged(path, f"its header is not valid JSON: {str(e).splitlines()[0]}") from None
    try:
        meta = json.loads((header.pop("__metadata__", {}) or {}).get("med3dinsight", "{}"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (AttributeError, ValueError):
        raise _damaged(path, "its med3dinsight metadata is not readable") from None
    entries = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
            ok = all(d >= 0 for d in shape) and 0 <= begin <= end and end - begin == int(np.prod(shape)) * \
                np.dtype(dtype).itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _damaged(path, f"tensor {name!r} has an invalid dtype, shape or offsets")
        if 8 + n + end > size:
            raise _damaged(path, f"tensor {name!r} ends at byte {8 + n + end} of a {size}-byte file: truncated")
        entries[name] = (dtype, shape, 8 + n + begin)
    return meta, entries


def _check_layout(path: Path, meta: Dict[str, Any], entries: Dict[str, Any], embed_dim: Optional[int],
                  has_text: Optional[bool], text_dim: Optional[int] = None, map_size: Optional[int] = None,
                  map_channels: Optional[int] = None) -> int:
    """The tensors and metadata a shard must hold (names, dtypes, shapes); returns its row count.

    ``None`` for ``embed_dim``/``text_dim``/``map_channels`` accepts the shard's own width; ``map_size`` ``None``
    means no ``image_map`` tensor (0: whatever the shard holds, for :func:`verify_cache` of an unreadable manifest).
    """
    cases, shapes = meta.get("cases"), meta.get("shapes")
    if meta.get("format") != FORMAT or not isinstance(cases, list) or not isinstance(shapes, dict) or \
            not all(isinstance(c, str) and isinstance(shapes.get(c), list) and len(shapes[c]) == 3 and
                    all(isinstance(d, int) and d > 0 for d in shapes[c]) for c in cases):
        raise _damaged(path, "its med3dinsight metadata lacks the cases and their shapes")
    expected = {"plane": np.uint8, "index": np.int32, "position": np.float32, "case": np.int32, "image": np.float16}
    if has_text or (has_text is None and "text" in entries):
        expected["text"] = np.float16
    if map_size is not None and (map_size or "image_map" in entries):
        expected["image_map"] = np.float16
    if set(entries) != set(expected):
        raise _damaged(path, f"tensors {sorted(entries)}, expected {sorted(expected)}")
    n = entries["plane"][1][0] if len(entries["plane"][1]) == 1 else -1
    for name, dtype in expected.items():
        got_dtype, shape, _ = entries[name]
        if name in ("plane", "index", "position", "case"):
            want = (n,)
        elif name == "image_map":
            size = map_size or (shape[2:3] or [-1])[0]
            want = (n, map_channels or (shape[1:2] or [-1])[0], size, size)
        else:
            width = embed_dim if name == "image" else text_dim
            want = (n, width or (shape[1:] or [-1])[0])
        if got_dtype != dtype or shape != want or n < 0 or (name == "image_map" and min(want[1:]) < 1):
            raise _damaged(path, f"tensor {name!r} is {np.dtype(got_dtype).name} {list(shape)}, expected "
                                 f"{np.dtype(dtype).name} {list(want)}")
    return n


def _check_rows(path: Path, meta: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> None:
    """Cheap checks of the small per-row arrays: planes, case ids (grouped), slice indices and positions in range."""
    plane, case = np.asarray(arrays["plane"]), np.asarray(arrays["case"])
    index, position = np.asarray(arrays["index"]), np.asarray(arrays["position"])
    problem = None
    if plane.size and plane.max() > 2:
        problem = "a plane id is not 0, 1 or 2"
    elif case.size and (case.min() < 0 or case.max() >= len(meta["cases"]) or np.any(np.diff(case) < 0)):
        problem = "the case column is out of range or out of order"
    elif not np.all(np.isfinite(position) & (position >= 0) & (position <= 1)):
        problem = "a slice position is not in [0, 1]"
    elif index.size:
        extent = np.asarray([meta["shapes"][c] for c in meta["cases"]], np.int64)[case, plane]
        if np.any((index < 0) | (index >= extent)):
            problem = "a slice index lies outside its volume"
    if problem:
        raise _damaged(path, problem)


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



def write_manifest(folder: Path, settings: Dict[str, Any], shard_cases: Dict[int, List[str]]) -> Path:
    """Describe the finished cache: every shard (rows, sha256) and every case (shape, shard)."""
    folder = Path(folder)
    shards, cases = [], {}
    for sid in sorted(shard_cases):
        path = folder / shard_name(sid)
        meta, entries = _read_header(path)
        shapes = meta["shapes"]
        shards.append({"file": path.name, "rows": entries["plane"][1][0], "cases": len(shard_cases[sid]),
                       "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        prints = meta.get("fingerprints") or {}
        for c in shard_cases[sid]:
            cases[c] = {"shard": path.name, "shape": shapes[c], "fingerprint": prints.get(c)}
    manifest = {"format": FORMAT, "format_version": format_version_for(settings), "settings": settings,
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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON or not UTF-8
        raise CacheError(f"cannot read {path} ({first_line(e)}); delete it and rerun med3dinsight embed with the "
                         f"same settings (it keeps the finished shards and rewrites the manifest)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a med3dinsight teacher cache manifest; delete it and rerun med3dinsight "
                         f"embed with the same settings")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CacheError(f"{path} has format_version {short_repr(version)}, this med3dinsight reads up to "
                         f"{FORMAT_VERSION}; upgrade med3dinsight or rerun med3dinsight embed into a new folder")
    shards, cases, settings = manifest.get("shards"), manifest.get("cases"), manifest.get("settings")
    if not (isinstance(settings, dict) and isinstance(manifest.get("settings_hash"), str)
            and isinstance(settings.get("teacher"), dict) and isinstance(cases, dict) and isinstance(shards, list)
            and all(isinstance(x, dict) and isinstance(x.get("file"), str) and _SHARD_RE.match(x["file"])
                    and isinstance(x.get("sha256"), str) for x in shards)):
        raise CacheError(f"{path} is damaged (settings, shards or cases missing or malformed); delete it and rerun "
                         f"med3dinsight embed with the same settings")
    return manifest


@dataclass
class CaseEntries:
    """The cached slices of one case (views into the memory-mapped shard)."""

    plane: np.ndarray  # (n,) uint8
    index: np.ndarray  # (n,) int32, slice index along the plane's canonical axis
    position: np.ndarray  # (n,) float32
    image: np.ndarray  # (n, E) float16
    text: Optional[np.ndarray]  # (n, T) float16 or None; T == E unless the text side is another model
    shape: tuple  # canonical (D, H, W) of the volume the slices were taken from
    image_map: Optional[np.ndarray] = None  # (n, C, S, S) float16 on the canonical in-plane axes, or None


class TeacherCache:
    """A finished cache, opened for training (memory-mapped; no 2D model is touched).

    Opening checks every shard cheaply against the manifest (file size, header, tensor layout, row metadata), and
    :meth:`entries` checks that a case's embeddings are finite unit vectors the first time they are read; damage
    raises :class:`CacheError` naming the shard (``med3dinsight cache verify`` compares the full checksums).

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
        self._shard_of: Dict[str, Path] = {}
        self._fingerprints: Dict[str, Optional[str]] = {}
        self._checked: set = set()
        self._warned = False
        try:
            embed_dim, text_dim = self.embed_dim, self.text_dim
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{self.folder / MANIFEST} lacks the teacher's embed_dim; rerun med3dinsight embed into "
                             f"a new folder") from None
        map_size = self.settings.get("feature_maps")
        if map_size is not None and (isinstance(map_size, bool) or not isinstance(map_size, int) or map_size < 1):
            raise CacheError(f"{self.folder / MANIFEST} has an invalid feature_maps setting {short_repr(map_size)}; "
                             f"rerun med3dinsight embed into a new folder")
        self._map_shape: Optional[tuple] = None
        for shard in self.manifest["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise CacheError(f"{path} is missing; rerun med3dinsight embed with the same settings to rewrite it")
            size, recorded = path.stat().st_size, shard.get("bytes")
            if isinstance(recorded, int) and size != recorded:
                raise CacheError(f"{path} is {size} bytes but {MANIFEST} recorded {recorded} (truncated or replaced); "
                                 f"{_VERIFY_HINT}")
            meta, entries = _read_header(path)
            if meta.get("settings") != self.manifest["settings_hash"]:
                raise StaleCacheError(f"{path} was written with other settings than {self.folder / MANIFEST}; "
                                      f"rerun med3dinsight embed into a new folder")
            channels = self._map_shape[0] if self._map_shape else None
            _check_layout(path, meta, entries, embed_dim, self.has_text, text_dim, map_size, channels)
            if map_size is not None and self._map_shape is None:
                self._map_shape = tuple(int(d) for d in entries["image_map"][1][1:])
            arrays = {k: _memmap(path, e) for k, e in entries.items()}
            _check_rows(path, meta, arrays)
            case_ids, shapes = meta["cases"], meta["shapes"]
            prints = meta.get("fingerprints") if isinstance(meta.get("fingerprints"), dict) else {}
            order = np.asarray(arrays["case"])
            for i, case in enumerate(case_ids):
                rows = np.flatnonzero(order == i)
                lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
                text, maps = arrays.get("text"), arrays.get("image_map")
                self._cases[case] = CaseEntries(np.asarray(arrays["plane"][lo:hi]), np.asarray(arrays["index"][lo:hi]),
                                                np.asarray(arrays["position"][lo:hi]), arrays["image"][lo:hi],
                                                None if text is None else text[lo:hi], tuple(shapes[case]),
                                                None if maps is None else maps[lo:hi])
                self._shard_of[case] = path
                self._fingerprints[case] = prints.get(case) if isinstance(prints.get(case), str) else None

    @property
    def cases(self) -> List[str]:
        return sorted(self._cases)

    @property
    def embed_dim(self) -> int:
        return int(self.settings["teacher"]["embed_dim"])

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings: the teacher's ``text_dim``, or ``embed_dim`` (one shared space, and caches
        written before text widths were recorded)."""
        value = self.settings["teacher"].get("text_dim")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else self.embed_dim

    @property
    def shared_space(self) -> bool:
        """Whether the image and text embeddings lie in one space (open_clip; ``True`` for caches written before this
        was recorded); ``False`` when they come from different models (e.g. a timm image model and a sentence
        encoder), so only image-image and text-text similarities are meaningful."""
        value = self.settings["teacher"].get("shared_space")
        return value if isinstance(value, bool) else True

    @property
    def has_text(self) -> bool:
        return self.settings.get("captions") is not None

    @property
    def has_maps(self) -> bool:
        """Whether every slice has its spatial feature map (``CaseEntries.image_map``)."""
        return self.settings.get("feature_maps") is not None

    @property
    def map_shape(self) -> Optional[tuple]:
        """``(C, S, S)`` of each slice's feature map, or ``None`` without maps."""
        if not self.has_maps:
            return None
        return self._map_shape or (0, self.settings["feature_maps"], self.settings["feature_maps"])

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
        """The cached slices of ``case``; a case the cache lacks raises :class:`CacheError`, and so do embeddings
        that are not finite unit vectors (checked the first time each case is read)."""
        if case not in self._cases:
            raise CacheError(f"the teacher cache {self.folder} has no slices of case {case!r}; rerun med3dinsight "
                             f"embed on the current dataset (it adds what is missing)")
        e = self._cases[case]
        if case not in self._checked:
            if e.image_map is not None and len(e.image_map) and not np.isfinite(e.image_map).all():
                raise CacheError(f"{self._shard_of[case]} is damaged: the feature maps of case {case} are not finite "
                                 f"(NaN/Inf); {_VERIFY_HINT}")
            for name, emb in (("image", e.image), ("text", e.text)):
                if emb is None or not len(emb):
                    continue
                x = np.asarray(emb, dtype=np.float32)
                finite = bool(np.isfinite(x).all())
                if not finite or np.abs(np.linalg.norm(x, axis=-1) - 1).max() > 1e-2:
                    raise CacheError(f"{self._shard_of[case]} is damaged: the {name} embeddings of case {case} are "
                                     f"{'not finite (NaN/Inf)' if not finite else 'not unit vectors'}; "
                                     f"{_VERIFY_HINT}")
            self._checked.add(case)
        return e

    def fingerprint(self, case: str) -> Optional[str]:
        """The :meth:`~med3dinsight_plugin.volumes.Volume.fingerprint` of the volume ``case``'s slices were taken
        from, or ``None`` for a cache written before fingerprints were recorded (format version 1)."""
        if case not in self._cases:
            self.entries(case)  # raises the usual error
        return self._fingerprints.get(case)

    def check_fingerprint(self, case: str, fingerprint: str) -> None:
        """Refuse (:class:`StaleCacheError`) if ``case`` was cached from a volume with another content than the one
        whose fingerprint is given; warn once (and accept) for a cache that predates fingerprints."""
        stored = self.fingerprint(case)
        if stored is None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"the teacher cache {self.folder} was written before volume fingerprints were recorded, "
                              f"so it cannot check that its slices come from these volumes; rerun med3dinsight embed "
                              f"into a new folder to get that check", stacklevel=2)
            return
        if stored != fingerprint:
            raise StaleCacheError(f"the teacher cache {self.folder} was made from another image for case {case!r} "
                                  f"(same name and shape, different voxels); rerun med3dinsight embed on the current "
                                  f"data into a new folder, or pass the cache made from this data")

    def check_volume(self, volume) -> None:
        """:meth:`check_fingerprint` for a :class:`~med3dinsight_plugin.volumes.Volume` just read."""
        self.check_fingerprint(volume.case, volume.fingerprint())


def verify_cache(folder) -> List[str]:
    """Check every shard of a cache: present, size and checksum, readable, consistent rows, finite unit-norm
    embeddings.

    Returns:
        One line per problem found (empty when the cache is sound).
    """
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except CacheError as e:
        return [str(e)]
    problems = []
    settings = manifest["settings"]
    embed_dim = settings["teacher"].get("embed_dim")
    embed_dim = embed_dim if isinstance(embed_dim, int) and not isinstance(embed_dim, bool) else None
    text_dim = settings["teacher"].get("text_dim")
    text_dim = text_dim if isinstance(text_dim, int) and not isinstance(text_dim, bool) else embed_dim
    has_text = settings.get("captions") is not None
    map_size = settings.get("feature_maps") if isinstance(settings.get("feature_maps"), int) else None
    channels = None
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            problems.append(f"{path}: missing; rerun med3dinsight embed with the same settings to rewrite it")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: checksum mismatch (the file changed or is corrupt); delete it and rerun "
                            f"med3dinsight embed with the same settings")
            continue
        try:
            meta, entries = _read_header(path)
            _check_layout(path, meta, entries, embed_dim, has_text, text_dim, map_size, channels)
            if map_size is not None:
                channels = channels or entries["image_map"][1][1]
            arrays = {k: _memmap(path, e) for k, e in entries.items()}
            _check_rows(path, meta, arrays)
        except CacheError as e:
            problems.append(str(e))
            continue
        for name in ("image", "text"):
            if name in arrays:
                emb = np.asarray(arrays[name], dtype=np.float32)
                norms = np.linalg.norm(emb, axis=-1) if emb.size else np.ones(0)
                if not np.isfinite(emb).all() or np.abs(norms - 1).max(initial=0) > 1e-2:
                    problems.append(f"{path}: {name} embeddings are not finite unit vectors")
        if "image_map" in arrays and not all(np.isfinite(arrays["image_map"][i:i + 64]).all()
                                             for i in range(0, len(arrays["image_map"]), 64)):
            problems.append(f"{path}: feature maps are not finite (NaN/Inf)")
        if meta.get("settings") != manifest["settings_hash"]:
            problems.append(f"{path}: written with other settings than the manifest")
    return problems
