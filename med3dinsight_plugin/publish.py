"""Publishing a checkpoint on the Hugging Face Hub: ``med3dinsight push``.

:func:`push_checkpoint` uploads the checkpoint file plus a model card (``README.md``) written from its metadata
(:func:`model_card`), with ``HfApi().upload_folder``; ``--dry-run`` stages the same folder locally. Local paths in
the metadata are left out unless asked. Reading from the Hub (``hf-hub:`` references) is :mod:`.hub`'s.

huggingface_hub is imported inside the functions only.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .checkpoint import load_checkpoint
from .errors import CheckpointError, first_line, short_repr
from .fileio import OutputError, atomic_write, atomic_write_text, sha256_file
from .hub import (
    HUB_FILENAME,
    HUB_PREFIX,
    HubSpec,
    _hub_failure,
    _repo_id_problem,
    _revision_problem,
    hub_offline,
)
from .model_card import _backbone_name, model_card

__all__ = ["PUSH_MANIFEST", "model_card", "push_checkpoint"]


PUSH_MANIFEST = ".med3dinsight-push.json"  # what push wrote into a staging folder: its files and their digests
_CARD = "README.md"
_OWN_FILES = (HUB_FILENAME, _CARD)
# atomic_write's temporary files of push's own files, left by a killed push
_OWN_TEMPORARY = re.compile(r"^\.(" + "|".join(re.escape(n) for n in (*_OWN_FILES, PUSH_MANIFEST))
                            + r")\.\d+\.[0-9a-f]{32}\.tmp$")


def push_checkpoint(checkpoint: Union[str, os.PathLike], repo_id: str, *, revision: Optional[str] = None,
                    private: bool = False, dry_run: Optional[Union[str, os.PathLike]] = None,
                    token: Optional[str] = None, keep_paths: bool = False) -> Dict[str, Any]:
    """Publish a med3dinsight checkpoint on the Hub: ``med3dinsight.safetensors`` plus a model card ``README.md``.

    The two files are written to a staging folder (with ``.med3dinsight-push.json``, the list of what push wrote
    there), then uploaded in one commit with ``HfApi().upload_folder`` (those two files only; the repository is
    created if needed, ``exist_ok``; a ``revision`` branch likewise). With ``HF_HUB_OFFLINE`` set and no ``dry_run``,
    nothing is read or sent: one line says so.

    A ``dry_run`` folder must be new, empty, or hold exactly what an earlier push wrote there (its list names every
    file and its content): push never replaces files it did not write, such as another run's checkpoint or a
    project's README.

    Local paths are not published unless ``keep_paths``: every metadata value that is a local path
    (``/...``, ``~/...``, ``./...``, ``../...``, ``C:\\...``, ``\\\\server\\...``, also after a prefix such as
    ``local-dir:`` or ``file://``) -- the pretraining data's ``data.root``, the run config's ``data.source`` /
    ``data.cache`` / ``output``, a teacher or captions model read from a folder -- becomes its last component, in the
    card and in the uploaded file's header. Only the header's metadata strings change: the tensors are copied byte for
    byte, and the file loads as the original does.

    Args:
        checkpoint: a checkpoint written by ``save_pretrained`` / ``med3dinsight pretrain`` (a path or ``hf-hub:``).
        repo_id: the target ``ORG/REPO`` (an ``hf-hub:`` prefix is accepted).
        revision: the branch to commit to (created from the default branch if missing); default the default branch.
        private: create the repository as private (an existing repository keeps its visibility).
        dry_run: write the staging folder here (created if missing) and upload nothing.
        token: a Hub token; default huggingface_hub's (``HF_TOKEN`` or ``hf auth login``).
        keep_paths: publish the metadata's local paths as they are (the file is then uploaded unchanged).

    Returns:
        ``{"repo_id", "revision", "folder" (the dry-run folder or None), "files" (the files published), "url" (the
        commit, or None on a dry run), "upload_command" (on a dry run, the ``hf upload`` line that publishes exactly
        those files; else None), "paths_removed" (the metadata keys whose paths were cut to their last component)}``.

    Raises:
        CheckpointError: a bad repository id or revision, a foreign or invalid checkpoint, offline mode, or a
            refused upload.
        OutputError: a ``dry_run`` folder that holds other files, or that cannot be written.
    """

    text = os.fspath(repo_id)
    name, at, branch = (text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text).partition("@")
    problem = _repo_id_problem(name)
    if problem:
        raise CheckpointError(f"push target {short_repr(text)}: {problem}; use ORG/REPO")
    if at:
        shown = branch if branch and not _revision_problem(branch) else short_repr(branch, 60)
        raise CheckpointError(f"push target {short_repr(text)}: pass the branch with --revision {shown}, not after "
                              f"'@'")
    if revision is not None:
        why = _revision_problem(revision)
        if why:
            raise CheckpointError(f"--revision {short_repr(revision, 60)} is not a branch name ({why}); pass a "
                                  f"branch such as dev or v1")
    target = HubSpec(name, revision)
    if dry_run is None and hub_offline():
        raise CheckpointError(f"HF_HUB_OFFLINE is set, so nothing was uploaded to {target.repo_id}; push where there "
                              f"is network (unset HF_HUB_OFFLINE), or write the files only with --dry-run FOLDER")
    folder = None if dry_run is None else Path(dry_run)
    if folder is not None:
        _check_staging_folder(folder)  # before anything is read: a refused folder costs nothing
    ckpt = load_checkpoint(checkpoint)  # resolved, validated, finite: only a usable file is published
    if ckpt.source_format != "med3dinsight":
        raise CheckpointError(f"{ckpt.path} is a {ckpt.source_format} file without med3dinsight metadata, so it "
                              f"would not describe itself on the Hub; push a checkpoint written by save_pretrained "
                              f"or med3dinsight pretrain")
    removed: List[str] = []
    meta = ckpt.metadata if keep_paths else _without_paths(ckpt.metadata, "", removed)
    card = model_card(meta, target)
    if removed:  # the same metadata, with names for paths, in the uploaded header
        def weights(tmp):
            _rewrite_metadata(ckpt.path, tmp, _header_without_paths)
    else:
        def weights(tmp):
            shutil.copyfile(ckpt.path, tmp)
    contents = {HUB_FILENAME: weights, _CARD: lambda tmp: Path(tmp).write_text(card, encoding="utf-8")}
    record = {"written_by": "med3dinsight push", "repo_id": target.repo_id, "revision": revision}
    result = {"repo_id": target.repo_id, "revision": revision, "folder": None, "files": list(contents), "url": None,
              "upload_command": None, "paths_removed": removed}
    if folder is not None:

        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create --dry-run folder {folder}: {e.strerror or e}") from None
        _stage(folder, contents, record, keep=None if removed else ckpt.path)
        command = ["hf", "upload", target.repo_id, str(folder), "."]
        command += [arg for f in contents for arg in ("--include", f)]
        command += (["--revision", revision] if revision else []) + (["--private"] if private else [])
        return {**result, "folder": str(folder), "upload_command": " ".join(map(shlex.quote, command))}
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="med3dinsight-push-") as tmp:
        _stage(Path(tmp), contents, record)
        api = HfApi(token=token)
        try:
            api.create_repo(target.repo_id, private=private, repo_type="model", exist_ok=True)
            if revision:
                api.create_branch(target.repo_id, branch=revision, repo_type="model", exist_ok=True)
            info = api.upload_folder(repo_id=target.repo_id, folder_path=tmp, repo_type="model", revision=revision,
                                     allow_patterns=list(contents),
                                     commit_message=f"med3dinsight push: {_backbone_name(ckpt.metadata)} checkpoint")
        except Exception as e:  # noqa: BLE001 -- only the hub's and its HTTP stack's failures; others re-raised
            if not _hub_failure(e):
                raise
            raise CheckpointError(f"uploading to {target.repo_id} failed ({first_line(e)}); check the network and "
                                  f"that you may write there (hf auth login, HF_TOKEN)") from None
    return {**result, "url": getattr(info, "commit_url", None) or str(info)}


# A metadata string that is a local path: absolute (POSIX, home, Windows drive or UNC) or explicitly relative, after an
# optional prefix (local-dir:, file://)
_LOCAL_PATH = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9+.-]+:)?(?P<path>(?:/|~|\.\.?[/\\]|[A-Za-z]:[/\\]|\\\\).*)$",
                         re.DOTALL)

_HOME = re.compile(r"^(?:/home|/Users|[A-Za-z]:[/\\]Users)[/\\][^/\\]+[/\\]*$", re.IGNORECASE)


def _local_name(text: str) -> str:
    """``text`` with a local path cut to its last component (``/home/me/data/Dataset990`` -> ``Dataset990``,
    ``local-dir:/home/me/BiomedCLIP`` -> ``local-dir:BiomedCLIP``); anything else (``org/repo``, a URL with a host,
    free text) unchanged."""
    found = _LOCAL_PATH.match(text)
    if not found:
        return text
    prefix, path = found.group("prefix") or "", found.group("path")
    if prefix and path.startswith("//") and not path.startswith("///"):
        return text  # scheme://host/...: a URL, not a local path
    name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    if name.startswith("~") or _HOME.match(path):
        name = "~"  # a home folder's name is its user's
    return ("" if prefix.lower() == "file:" else prefix) + name if name else text


def _without_paths(value: Any, where: str, removed: List[str]) -> Any:
    """``value`` (JSON-like) with every string that is a local path cut to its last component; the dotted keys
    changed are appended to ``removed``. Dictionary keys are kept."""
    if isinstance(value, dict):
        return {k: _without_paths(v, f"{where}.{k}" if where else str(k), removed) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v, f"{where}[{i}]", removed) for i, v in enumerate(value)]
    if isinstance(value, str):
        name = _local_name(value)
        if name != value:
            removed.append(where)
        return name
    return value


def _header_without_paths(header: Dict[str, str]) -> Dict[str, str]:
    """A safetensors ``__metadata__`` with :func:`_without_paths` applied to the ``med3dinsight`` JSON (what
    ``load_checkpoint`` validated, so the card and the header say the same) and to every other value."""
    import json

    return {k: json.dumps(_without_paths(json.loads(v), "", [])) if k == "med3dinsight" else _local_name(v)
            for k, v in header.items()}


def _rewrite_metadata(source: Path, target: str, transform) -> None:
    """Copy a safetensors file with its header's ``__metadata__`` (string to string) replaced by
    ``transform(__metadata__)``; the tensor entries and the data after the header are copied byte for byte (the
    format: 8 bytes little-endian header length, the JSON header padded with spaces to 8 bytes, the data)."""
    import json

    with open(source, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = transform(header.get("__metadata__") or {})
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(target, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            shutil.copyfileobj(f, out, 1 << 20)


def _read_manifest(folder: Path) -> Optional[Dict[str, set]]:
    """The files push wrote into ``folder`` by name, each with the SHA-256 digests it may have (the new one and,
    while a push is under way, the old one); None when there is no valid list."""
    import json

    try:
        record = json.loads((folder / PUSH_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == "med3dinsight push" \
        else None
    if not isinstance(files, dict):
        return None
    return {n: {d for d in digests if isinstance(d, str)} for n, digests in files.items()
            if n in _OWN_FILES and isinstance(digests, list)}


def _check_staging_folder(folder: Path) -> None:
    """Refuse a ``--dry-run`` folder unless push may write there: it is missing, empty, or holds exactly what an
    earlier push wrote (files named in its ``.med3dinsight-push.json`` with the digests listed there, plus temporary
    files of a killed push). One line names the folder and the fix."""

    fix = "pass a new or empty folder: push writes its files only into a folder that holds nothing else"
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputError(f"--dry-run {folder} is a file; pass a folder (created if missing)")
    try:
        entries = sorted(p.name for p in folder.iterdir() if not _OWN_TEMPORARY.match(p.name))
    except OSError as e:
        raise OutputError(f"cannot read the --dry-run folder {folder}: {e.strerror or e}") from None
    if not entries:
        return
    owned = _read_manifest(folder)
    if owned is None:
        raise OutputError(f"--dry-run {folder} already holds {_listing(entries)}, which med3dinsight push did not "
                          f"write there; {fix}")
    foreign = [n for n in entries if n != PUSH_MANIFEST and n not in owned]
    if foreign:
        raise OutputError(f"--dry-run {folder} holds {_listing(foreign)} besides an earlier push's files; {fix}")
    for name, digests in owned.items():
        path = folder / name
        if os.path.lexists(path) and (path.is_symlink() or not path.is_file() or sha256_file(path) not in digests):
            raise OutputError(f"--dry-run {folder}: {name} was changed since med3dinsight push wrote it; {fix} (or "
                              f"move {name} away to let push write it again)")


def _listing(names) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _stage(folder: Path, contents: Dict[str, Any], record: Dict[str, Any], keep: Optional[Path] = None) -> None:
    """Write push's files into ``folder`` (checked by :func:`_check_staging_folder`, or new), each through a
    temporary name renamed into place (:func:`~med3dinsight_plugin.fileio.atomic_write`), and the list of them,
    ``.med3dinsight-push.json``, with their digests. Before each rename the list allows the file's old and new
    digest, so a push killed at any point leaves a folder the next push accepts.

    Args:
        folder: the staging folder.
        contents: file name -> ``write(temporary path)``.
        record: what else the list says (repository, revision).
        keep: the checkpoint read; when it is the folder's own ``med3dinsight.safetensors`` (a dry run's output
            pushed again), it is kept rather than copied onto itself.
    """
    import json


    digests = {n: set(d) for n, d in (_read_manifest(folder) or {}).items()}

    def write_list():
        files = {n: sorted(d) for n, d in digests.items()}
        atomic_write_text(folder / PUSH_MANIFEST, json.dumps({**record, "files": files}, indent=1) + "\n")

    for name, write in contents.items():
        path = folder / name
        if name == HUB_FILENAME and keep is not None and path.is_file() and os.path.samefile(path, keep):
            digests[name] = {sha256_file(path)}
            continue

        written = []

        def write_and_list(tmp, name=name, write=write, written=written):
            write(tmp)
            written.append(sha256_file(tmp))
            digests.setdefault(name, set()).add(written[0])
            write_list()  # before the rename: the old file or the new one, either is listed

        atomic_write(path, write_and_list)
        digests[name] = set(written)
    write_list()


















