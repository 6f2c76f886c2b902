"""The adaptation plan a checkpoint carries (nnssl-style) and nnssl's pretraining ``Plan`` for an export."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional


def adaptation_plan(backbone, metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """nnssl's ``nnssl_adaptation_plan`` for a backbone, as nnssl's ``AdaptationPlan.serialize`` writes it
    (architecture, the pretraining ``Plan``, channels, patch, weight locations).

    Args:
        backbone: the pretrained :class:`~med3dinsight_plugin.backbones.Backbone`.
        metadata: the checkpoint's other metadata (``data``, ``intensity_normalization`` of a pretraining run), from
            which the pretraining plan takes the dataset, spacing and normalisation; see :func:`nnssl_pretrain_plan`.
    """
    return {
        "architecture_plans": backbone.nnssl_architecture(),
        "pretrain_plan": nnssl_pretrain_plan(backbone, metadata),
        "pretrain_num_input_channels": backbone.in_channels,
        "recommended_downstream_patchsize": list(backbone.patch_size),
        "key_to_encoder": backbone.key_to_encoder,
        "key_to_stem": backbone.key_to_stem,
        "keys_to_in_proj": list(backbone.keys_to_in_proj),
        "key_to_lpe": backbone.key_to_lpe,
    }


# Normalisation schemes pretraining applies itself to raw images (pretrain.data._normalize), both without a mask.
_OWN_SCHEMES = ("CTNormalization", "ZScoreNormalization")


def nnssl_pretrain_plan(backbone, metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``pretrain_plan`` of nnssl's adaptation plan: its ``Plan`` dataclass (``dataset_name``, ``plans_name``,
    ``original_median_spacing_after_transp``, ``image_reader_writer``, ``transpose_forward``, ``transpose_backward``,
    ``configurations``, ``experiment_planner_used``) with exactly one ``ConfigurationPlan`` (``data_identifier``,
    ``preprocessor_name``, ``spacing_style``, ``normalization_schemes``, ``use_mask_for_norm``, ``resampling_fn_data``,
    ``resampling_fn_data_kwargs``, ``resampling_fn_mask``, ``resampling_fn_mask_kwargs``, ``spacing``,
    ``patch_size``) under its spacing style's name, as nnssl's trainers keep only the configuration they used.
    nnU-Net's ``nnUNetv2_preprocess_like_nnssl`` / ``nnUNetv2_plan_like_dynamic`` read that configuration's
    ``spacing`` and ``patch_size``.

    Each field holds what the checkpoint tells, or null where it does not:

    * ``patch_size``: always, the crop the network was pretrained on.
    * From nnU-Net plans -- when the backbone was built from a dataset's plans and the pretraining data were that
      configuration's preprocessed arrays (``data``), or no ``data`` metadata says otherwise: the plans' dataset,
      plans name, median spacing, reader, transposes, planner, and the configuration's data identifier,
      preprocessor, target ``spacing`` (style ``"median"``: nnU-Net's fullres target is the dataset's median),
      normalisation and resampling (nnU-Net's ``resampling_fn_seg`` is nnssl's ``resampling_fn_mask``).
    * Raw images (``data.kind`` nifti / nnunet_raw): pretraining reads them at their own spacing, so style
      ``"noresample"``, spacing and resampling null; the scheme of ``intensity_normalization`` on every channel,
      without a mask.
    * Unknown to us, null: without plans describing the data, the planner's fields (``plans_name`` unless ``data``
      names one, ``original_median_spacing_after_transp``, ``image_reader_writer``, the transposes,
      ``experiment_planner_used``, ``data_identifier``, ``preprocessor_name``): no nnssl or nnU-Net planner prepared
      the data; without pretraining metadata either (a backbone saved by hand), also ``dataset_name``, ``spacing``
      and the normalisation. A null spacing always comes with style ``"noresample"``, the only style nnssl's
      ``ConfigurationPlan.serialize`` accepts without a spacing (nnU-Net's ``like_pretrained`` mode then keeps the
      dataset's own nnU-Net spacing).
    """
    meta = metadata if isinstance(metadata, dict) else {}
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    norm = meta.get("intensity_normalization") if isinstance(meta.get("intensity_normalization"), dict) else {}
    scheme = norm.get("scheme") if norm.get("scheme") in _OWN_SCHEMES else None
    cfg, channels = backbone.config, backbone.in_channels
    plans = cfg.get("plans") if isinstance(cfg.get("plans"), dict) else {}
    planned = getattr(backbone, "plans_configuration", None) if plans else None
    if planned is not None and (scheme is not None or (data and not (
            data.get("kind") == "nnunet_preprocessed" and data.get("plans_name") == plans.get("plans_name")
            and data.get("configuration") == cfg.get("configuration")))):
        planned = None  # the data were not these plans' preprocessed arrays
    planned = planned if isinstance(planned, dict) else {}
    from_plans = {k: plans.get(k) for k in ("dataset_name", "plans_name", "original_median_spacing_after_transp",
                                            "image_reader_writer", "transpose_forward", "transpose_backward",
                                            "experiment_planner_used")} if planned else {}
    spacing = planned.get("spacing")
    spacing = [float(x) for x in spacing] if isinstance(spacing, (list, tuple)) and len(spacing) == 3 else None
    if scheme is not None:
        schemes, masks = [scheme] * channels, [False] * channels
    else:
        schemes, masks = planned.get("normalization_schemes"), planned.get("use_mask_for_norm")
    root = data.get("root")
    style = "median" if spacing is not None else "noresample"
    configuration = {
        "data_identifier": planned.get("data_identifier"),
        "preprocessor_name": planned.get("preprocessor_name"),
        "spacing_style": style,
        "normalization_schemes": schemes,
        "use_mask_for_norm": masks,
        "resampling_fn_data": planned.get("resampling_fn_data"),
        "resampling_fn_data_kwargs": planned.get("resampling_fn_data_kwargs"),
        "resampling_fn_mask": planned.get("resampling_fn_seg"),
        "resampling_fn_mask_kwargs": planned.get("resampling_fn_seg_kwargs"),
        "spacing": spacing,
        "patch_size": [int(p) for p in backbone.patch_size],
    }
    return {
        "dataset_name": Path(root).name if isinstance(root, str) and root else from_plans.get("dataset_name"),
        "plans_name": data.get("plans_name") if isinstance(data.get("plans_name"), str) else
        from_plans.get("plans_name"),
        "original_median_spacing_after_transp": from_plans.get("original_median_spacing_after_transp"),
        "image_reader_writer": from_plans.get("image_reader_writer"),
        "transpose_forward": from_plans.get("transpose_forward"),
        "transpose_backward": from_plans.get("transpose_backward"),
        "configurations": {style: configuration},
        "experiment_planner_used": from_plans.get("experiment_planner_used"),
    }
