"""nnU-Net's on-disk dataset layout: ``dataset.json`` (channel names, and from them the modality), a raw dataset's
cases in ``imagesTr`` (found by nnU-Net's own helper), a preprocessed dataset's plans, configuration and cases, and
the raw dataset it was made from (``raw=``, else ``$nnUNet_raw/<dataset_name>``); each gives a
:class:`~.source.VolumeSource`. nnunetv2 is imported inside the functions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..errors import first_line, short_repr
from .common import VolumeError
from .preprocessed import _image_reader
from .source import VolumeSource, _given_or


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise VolumeError(f"cannot read {path} ({first_line(e)}); fix or regenerate it") from None
    if not isinstance(data, dict):
        raise VolumeError(f"{path} holds a JSON {type(data).__name__}, not an object; fix or regenerate it")
    return data


def _channel_names(ds: Dict[str, Any], path: Path) -> Dict[str, str]:
    """``channel_names`` of a dataset.json (nnU-Net v2; v1's ``modality`` is accepted), checked."""
    channels = ds.get("channel_names", ds.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise VolumeError(f"{path} lacks channel_names (nnU-Net v2 needs it, e.g. \"channel_names\": "
                          f"{{\"0\": \"CT\"}}); add it")
    if sorted(channels) != [str(i) for i in range(len(channels))]:
        raise VolumeError(f"{path}: channel_names keys must be \"0\", \"1\", ... in order, got "
                          f"{short_repr(sorted(channels))}; fix it")
    return {str(k): str(v) for k, v in channels.items()}


def _dataset_modality(channels: Dict[str, str], path: Path) -> Tuple[str, str]:
    # as nnU-Net: channel name "CT" (any case) gets CTNormalization, anything else a z-score: MRI-like
    name = channels["0"].strip()
    return ("ct" if name.casefold() == "ct" else "mri"), f"channel_names[\"0\"] = {name!r} in {path}"


def _raw_source(root: Path, modality: str) -> VolumeSource:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    ds_path = root / "dataset.json"
    ds = _load_json(ds_path)
    channels = _channel_names(ds, ds_path)
    if "dataset" not in ds and not isinstance(ds.get("file_ending"), str):
        raise VolumeError(f"{ds_path} lacks file_ending (e.g. \"file_ending\": \".nii.gz\"); add it")
    try:
        entries = get_filenames_of_train_images_and_targets(str(root), ds)
    except (KeyError, OSError, TypeError, AttributeError) as e:
        raise VolumeError(f"{ds_path} does not describe the files in imagesTr ({type(e).__name__}: {e}); check "
                          f"file_ending and channel_names") from None
    files = {case: list(e["images"]) for case, e in entries.items()}
    if not files:
        raise VolumeError(f"{root / 'imagesTr'} has no cases ending in {ds.get('file_ending')!r}")
    for case, images in files.items():
        if len(images) != len(channels):
            raise VolumeError(f"case {case} in {root / 'imagesTr'} has {len(images)} channel file(s) but {ds_path} "
                              f"names {len(channels)} channel(s); add the missing _000N files or fix channel_names")
        expected = [f"{case}_{i:04d}{ds['file_ending']}" for i in range(len(channels))]
        if "dataset" not in ds and [os.path.basename(p) for p in images] != expected:
            raise VolumeError(f"case {case} in {root / 'imagesTr'} has {', '.join(map(os.path.basename, images))} but "
                              f"the {len(channels)} channel(s) of {ds_path} are {', '.join(expected)}; number the "
                              f"channel files _0000, _0001, ... without gaps (rename them) or fix channel_names")
    mod, why = _given_or(modality, lambda: _dataset_modality(channels, ds_path))
    return VolumeSource("nnunet_raw", root, files, mod, len(channels), modality_reason=why)


def _find_raw(raw: Optional[os.PathLike], plans: Dict[str, Any]) -> Optional[Path]:
    """The raw dataset of a preprocessed one: ``raw`` when given (it must be one), else
    ``$nnUNet_raw/<plans' dataset_name>`` when that is an nnU-Net raw dataset, else None."""
    if raw is not None:
        root = Path(raw).expanduser()
        if not ((root / "dataset.json").is_file() and (root / "imagesTr").is_dir()):
            raise VolumeError(f"raw={root} is not an nnU-Net raw dataset (dataset.json + imagesTr); pass the raw "
                              f"dataset that was preprocessed")
        return root
    base, name = os.environ.get("nnUNet_raw"), plans.get("dataset_name")
    if base and isinstance(name, str) and name:
        root = Path(base) / name
        if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
            return root
    return None


def _preprocessed_source(root: Path, modality: str, configuration: str, plans_name: str,
                         raw: Optional[os.PathLike] = None) -> VolumeSource:
    plans_path = root / f"{plans_name}.json"
    plans = _load_json(plans_path)
    ds_path = root / "dataset.json"
    ds = _load_json(ds_path)
    channels = _channel_names(ds, ds_path)
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or configuration not in configurations:
        raise VolumeError(f"{plans_path} has no configuration {configuration!r}; choose one of "
                          f"{sorted(configurations) if isinstance(configurations, dict) else []} (--configuration)")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        cm = PlansManager(plans).get_configuration(configuration)
        data_identifier, spacing = cm.data_identifier, list(cm.spacing)
        schemes = list(cm.normalization_schemes)
        transpose = [int(t) for t in plans["transpose_forward"]]
        if sorted(transpose) != [0, 1, 2]:
            raise ValueError(f"transpose_forward {transpose} is not a permutation of 0, 1, 2")
        ct_stats = None
        if schemes and schemes[0] == "CTNormalization":
            stats = plans["foreground_intensity_properties_per_channel"]["0"]
            ct_stats = (float(stats["mean"]), float(stats["std"]))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise VolumeError(f"{plans_path} is not a complete nnU-Net plans file ({type(e).__name__}: {e}); rerun "
                          f"nnUNetv2_plan_and_preprocess") from None
    folder = root / data_identifier
    cases = sorted({p.name.split(".")[0] for p in folder.glob("*.pkl")}) if folder.is_dir() else []
    if not cases:
        raise VolumeError(f"{folder} holds no preprocessed cases; run nnUNetv2_preprocess -d "
                          f"{plans.get('dataset_name')} -c {configuration} -plans_name {plans_name}")
    extra: Dict[str, Any] = {"data_folder": str(folder), "transpose_forward": transpose, "spacing": spacing,
                             "plans_name": plans_name, "configuration": configuration,
                             "reader": _image_reader(plans, ds)}
    raw_root = _find_raw(raw, plans)
    if raw_root is not None:
        raw_files = _raw_source(raw_root, "ct")._files
        missing = [c for c in cases if c not in raw_files]
        if missing:
            raise VolumeError(f"the raw dataset {raw_root} lacks {len(missing)} preprocessed case(s) (e.g. "
                              f"{missing[0]}); pass the raw dataset that was preprocessed (raw=), or unset nnUNet_raw "
                              f"to render from the preprocessed data")
        extra.update(raw_root=str(raw_root), raw_files=raw_files, plans=plans, dataset_json=ds)
    if ct_stats is not None:
        extra["ct_stats"] = ct_stats
    mod, why = _given_or(modality, lambda: ("ct", f"CTNormalization in {plans_path}") if ct_stats is not None
                         else _dataset_modality(channels, ds_path))
    return VolumeSource("nnunet_preprocessed", root, {c: [str(folder / c)] for c in cases}, mod, len(channels), extra,
                        modality_reason=why)
