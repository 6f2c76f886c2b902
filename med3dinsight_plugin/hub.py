"""Checkpoints on the Hugging Face Hub, as open_clip and timm users expect them.

``hf-hub:ORG/REPO`` or ``hf-hub:ORG/REPO@REVISION`` (a branch, tag or commit) names the file
``med3dinsight.safetensors`` of a Hub model repository wherever a checkpoint path is accepted: the one resolver,
:func:`~med3dinsight_plugin.checkpoint.resolve_checkpoint`, turns it into a file of huggingface_hub's cache
(``hf_hub_download``), so ``load_checkpoint``, ``read_checkpoint_info``, ``load_pretrained_encoder``, the MONAI
handler, ``nnunet-attach``, ``$MED3DINSIGHT_CHECKPOINT`` of the nnU-Net trainers, ``export`` and ``inspect`` all take
it. With ``HF_HUB_OFFLINE=1`` only the cache is read, and a file that is not there fails at once with one line naming
the repository and the ``hf download`` command that fetches it.

Publishing (``med3dinsight push``, the model card) is :mod:`.publish`'s; this module only names and downloads.

huggingface_hub is imported inside the functions only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .errors import CheckpointError, first_line, short_repr

__all__ = ["HUB_FILENAME", "HUB_PREFIX", "HubSpec", "download_checkpoint", "hub_offline", "is_hub_spec",
           "parse_hub_spec", "pinned_spec"]

HUB_PREFIX = "hf-hub:"
HUB_FILENAME = "med3dinsight.safetensors"  # = checkpoint.DEFAULT_FILENAME: what save_pretrained writes in a folder
_FORM = "hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_offline() -> bool:
    """Whether hub downloads are switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    The variables are read here too: huggingface_hub reads them once at import, which may precede the user's setting.

    Returns:
        True when only the local Hugging Face cache may be read.
    """
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags)


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf-hub:`` checkpoint reference.

    Attributes:
        repo_id: ``ORG/REPO``.
        revision: the branch, tag or commit after ``@``; ``None`` means the default branch.
    """

    repo_id: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    def download_command(self) -> str:
        """The ``hf`` command line that puts the checkpoint into the local cache."""
        return f"hf download {self.repo_id} {HUB_FILENAME}" + (f" --revision {self.revision}" if self.revision else "")


def is_hub_spec(value: Any) -> bool:
    """Whether a checkpoint argument names a Hub repository rather than a local path.

    Args:
        value: what the user passed (a string, a path, a loaded checkpoint, a state dict, ...).

    Returns:
        True for strings (and paths) that start with ``hf-hub:``.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def parse_hub_spec(spec: Union[str, os.PathLike]) -> HubSpec:
    """Split ``hf-hub:ORG/REPO[@REVISION]`` into repository and revision, checking both before anything reads them
    (huggingface_hub joins a revision into paths of its cache: ``@../../x`` would name a file outside it).

    Args:
        spec: the reference, with its ``hf-hub:`` prefix.

    Returns:
        The :class:`HubSpec`.

    Raises:
        CheckpointError: one line naming the malformed reference (shortened) and the form it must have.
    """
    text = os.fspath(spec)
    body = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text
    repo_id, at, revision = body.partition("@")
    problem = _repo_id_problem(repo_id)
    if problem is None and at:
        why = _revision_problem(revision)
        if why:
            problem = f"{short_repr(revision, 60)} after '@' is not a revision, a branch, tag or commit ({why})"
    if problem:
        raise CheckpointError(f"checkpoint {short_repr(text)}: {problem}; use {_FORM}")
    return HubSpec(repo_id, revision or None)


def _repo_id_problem(repo_id: str) -> Optional[str]:
    """Why ``repo_id`` is not a Hub ``ORG/REPO`` id (the value shortened), or None."""
    if not repo_id:
        return "it names no repository"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        return f"{short_repr(repo_id, 60)} is not ORG/REPO"
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
    except ValueError:  # HFValidationError
        return (f"{short_repr(repo_id, 60)} is not a Hub repository id (letters, digits, '-', '_', '.'; no leading "
                f"or trailing '-' or '.', no '--' or '..'; at most 96 characters)")
    return None


_MAX_REVISION = 255  # a branch or tag name is a file name in huggingface_hub's cache (refs/NAME)
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\@]")


def _revision_problem(revision: str) -> Optional[str]:
    """Why ``revision`` is not a branch, tag or commit name git and the Hub accept (``git check-ref-format``: no
    ``..``, no part starting with ``.``, no control characters, spaces or ``~^:?*[\\``), or None. ``refs/pr/N``
    (a pull request) passes."""
    if not revision:
        return "it is empty"
    if len(revision) > _MAX_REVISION:
        return f"{len(revision)} characters; at most {_MAX_REVISION}"
    if _REF_FORBIDDEN.search(revision):
        return "it holds a space, a control character or one of ~ ^ : ? * [ \\ @"
    parts = revision.split("/")
    if any(not part or part.startswith(".") or part.endswith(".lock") for part in parts) or revision.endswith("."):
        return ("a leading, trailing or doubled '/', a part starting with '.' (such as '..'), or ending in '.' or "
                "'.lock'")
    return None


def download_checkpoint(spec: Union[str, os.PathLike]) -> Path:
    """The local file of ``hf-hub:ORG/REPO[@REVISION]``: ``med3dinsight.safetensors`` of that repository, from
    huggingface_hub's cache, downloaded first unless ``HF_HUB_OFFLINE`` is set.

    Args:
        spec: the ``hf-hub:`` reference.

    Returns:
        The file's path in the cache (``.../models--ORG--REPO/snapshots/COMMIT/med3dinsight.safetensors``).

    Raises:
        CheckpointError: one line for a malformed reference, a file missing from the cache offline (with the
            ``hf download`` command that fetches it), or a repository, revision or file the Hub does not have.
    """
    hub = parse_hub_spec(spec)
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    where = f"{HUB_FILENAME} of {hub.repo_id}" + (f" at revision {hub.revision!r}" if hub.revision else "")
    try:
        return Path(hf_hub_download(hub.repo_id, HUB_FILENAME, revision=hub.revision, local_files_only=offline))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise CheckpointError(f"{hub}: {where} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                              f"{why}; fetch it where there is network: {hub.download_command()}") from None
    except GatedRepoError:
        reason = "is in a gated repository: accept its conditions on the Hub, then log in (hf auth login)"
    except RepositoryNotFoundError:
        reason = ("cannot be read: the Hub has no model repository of that name, or it is private and you are not "
                  "logged in (hf auth login)")
    except RevisionNotFoundError:
        reason = f"cannot be read: {hub.repo_id} has no such branch, tag or commit; check the part after '@'"
    except RemoteEntryNotFoundError:
        reason = (f"does not exist: the repository holds no med3dinsight checkpoint (publish one with: med3dinsight "
                  f"push CHECKPOINT {hub.repo_id})")
    except Exception as e:  # noqa: BLE001 -- only the hub's and its HTTP stack's failures; others re-raised
        if not _hub_failure(e):
            raise
        raise CheckpointError(f"{hub}: cannot download {where} ({first_line(e)}); check the network, or fetch it "
                              f"where there is one: {hub.download_command()}") from None
    raise CheckpointError(f"{hub}: {where} {reason}")


def pinned_spec(spec: Union[str, os.PathLike], path: Union[str, os.PathLike]) -> str:
    """``hf-hub:ORG/REPO@COMMIT`` for a reference resolved to ``path``: the exact commit read, so that a record
    (e.g. the plans nnunet-attach writes) names these weights even after the branch moves on.

    Args:
        spec: the ``hf-hub:`` reference as given.
        path: the file :func:`download_checkpoint` returned for it (``.../snapshots/COMMIT/...``).

    Returns:
        The reference pinned to the snapshot's commit; the reference unchanged when the path shows none.
    """
    hub = parse_hub_spec(spec)
    commit = Path(path).parent.name
    return str(HubSpec(hub.repo_id, commit)) if _COMMIT.match(commit) else str(hub)


def _hub_failure(e: BaseException) -> bool:
    """Whether an exception comes from talking to the Hub (huggingface_hub, its HTTP client, the OS), not a bug."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, OSError) or module in ("huggingface_hub", "httpx", "httpx2", "requests", "urllib3")
