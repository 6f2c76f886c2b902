"""``med3dinsight`` command line: thin argument parsing over the Python API.

Bad input (a :class:`~med3dinsight_plugin.errors.Med3DInsightError`, or an ``OSError`` on a user's path) ends with
one line on stderr naming what is wrong and exit code 2; any other exception is a bug and keeps its traceback.
``MED3DINSIGHT_DEBUG=1`` shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from ._version import __version__
from .errors import Med3DInsightError, first_line, short_repr


def _cmd_models(args: argparse.Namespace) -> int:
    from .backbones import backbone_family, list_backbones
    from .distributed import resolve_device
    from .summary import is_out_of_memory, summarize

    for option, value, what in (("--batch", args.batch, "volumes per forward pass"),
                                ("--slices", args.slices, "slices aligned per volume")):
        if value < 1:
            raise Med3DInsightError(f"{option} {value}: pass a positive number of {what} (default "
                                    f"{2 if option == '--batch' else 4})")
    if args.batch * args.slices < 2:
        raise Med3DInsightError(f"--batch {args.batch} --slices {args.slices}: the alignment needs at least 2 slice "
                                f"pairs (the other pairs are its negatives); raise --batch or --slices")
    if any(p < 1 for p in args.patch_size):
        raise Med3DInsightError(f"--patch-size {' '.join(map(str, args.patch_size))}: pass three positive sizes in "
                                f"voxels, e.g. --patch-size 64 64 64")
    device = str(resolve_device(args.device, option="--device"))
    # builders that need a plans file cannot run on random data alone
    names = args.backbones or [n for n in list_backbones() if n not in backbone_family(n).plans_builders]
    print(f"Med3DInsight models on random data: batch {args.batch}, {args.slices} slices per volume, "
          f"patch {tuple(args.patch_size)}, PSAT preset {args.psat!r}, device {device}")
    for name in names:
        try:
            s = summarize(name, args.patch_size, args.batch, args.slices, device, psat=args.psat)
        except RuntimeError as e:  # torch.OutOfMemoryError is one too
            if not is_out_of_memory(e):
                raise
            raise Med3DInsightError(f"{name} at --batch {args.batch}, --slices {args.slices}, --patch-size "
                                    f"{' '.join(map(str, args.patch_size))} does not fit in the memory of {device} "
                                    f"(torch could not allocate it); use a smaller --batch, --slices or "
                                    f"--patch-size") from None
        print(f"\n{name} ({s['network']})")
        print(f"  parameters   network {s['network_params'] / 1e6:.2f}M, PSAT {s['psat_params'] / 1e6:.2f}M, "
              f"total {s['total_params'] / 1e6:.2f}M")
        print(f"  input {s['input']} -> tokens {s['tokens']} -> PSAT {s['prediction']}; "
              f"reconstruction {s['reconstruction']}")
        print(f"  losses {s['losses']} ({s['seconds']} s)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.to, args.output, plans=args.plans,
                               configuration=args.configuration)
    print(f"wrote {result.path} ({result.format}, {result.tensors} tensors)")
    if result.note:
        print(f"note: {result.note}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import read_checkpoint_info
    from .hub import is_hub_spec
    from .loading import architecture_line

    info = read_checkpoint_info(args.checkpoint)  # header and shapes only: no tensor data is read
    name = f"{args.checkpoint} ({info.path})" if is_hub_spec(args.checkpoint) else info.path
    print(f"{name}: {info.source_format}, {len(info.tensors)} network tensors, {info.values / 1e6:.2f}M values")
    meta = info.metadata
    if info.source_format == "med3dinsight":  # validated at read: these keys exist and have the format's types
        cfg = meta["backbone"]
        print(f"  backbone      {cfg['name']} ({meta['network_class'].rsplit('.', 1)[-1]}), in_channels "
              f"{meta['in_channels']}, patch {tuple(meta['patch_size'])}")
        # what the loader's refusal of another architecture points to: build the network with these arguments
        print(f"  architecture  {architecture_line(meta)}")
        if "configuration" in cfg and isinstance(cfg.get("plans"), dict):
            print(f"  nnU-Net plans {cfg['plans'].get('plans_name')} of {cfg['plans'].get('dataset_name')}, "
                  f"configuration {cfg['configuration']}")
        print(f"  encoder       {', '.join(meta['encoder_prefixes'])}")
        for key in sorted(set(meta) - _SHOWN):
            print(f"  {key:<13} {short_repr(meta[key], 200)}")
    elif info.encoder_prefixes:
        print(f"  encoder       {', '.join(info.encoder_prefixes)}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .publish import push_checkpoint

    result = push_checkpoint(args.checkpoint, args.repo, revision=args.revision, private=args.private,
                             dry_run=args.dry_run, keep_paths=args.keep_paths)
    where = result["repo_id"] + (f"@{result['revision']}" if result["revision"] else "")
    if result["folder"] is not None:
        print(f"wrote {', '.join(result['files'])} to {result['folder']} (dry run: nothing uploaded; "
              f"push them with: {result['upload_command']})")
    else:
        print(f"pushed {', '.join(result['files'])} to {where}: {result['url']}")
        print(f"load it with: hf-hub:{where}")
    removed = result["paths_removed"]
    if removed:
        shown = ", ".join(removed[:4]) + (f" and {len(removed) - 4} more" if len(removed) > 4 else "")
        print(f"note: local paths in the metadata ({shown}) are published as their last component; --keep-paths "
              f"publishes them whole")
    return 0


def _cmd_nnunet_env(args: argparse.Namespace) -> int:
    import shlex

    from nnunet_trainers.shim import ENV_EXT_TRAINER, ext_trainer_path

    print(f"export {ENV_EXT_TRAINER}={shlex.quote(ext_trainer_path(os.environ.get(ENV_EXT_TRAINER)))}")
    return 0


def _cmd_nnunet_attach(args: argparse.Namespace) -> int:
    from nnunet_trainers.attach import attach_checkpoint

    if args.checkpoint is None:  # -c was the checkpoint before it became the configuration, as in nnU-Net
        c = args.configuration
        was_checkpoint = c.startswith("hf-hub:") or c.endswith((".safetensors", ".pt", ".pth")) or Path(c).is_file()
        raise Med3DInsightError("--checkpoint is required" + (
            f" (-c {short_repr(c, 400)} looks like a checkpoint, but -c is nnU-Net's configuration as in "
            f"nnUNetv2_train; pass the checkpoint as --checkpoint {short_repr(c, 400)})" if was_checkpoint else
            ": the pretrained checkpoint, a file or hf-hub:ORG/REPO[@REVISION]"))
    result = attach_checkpoint(args.dataset, args.plans, args.checkpoint, name=args.name,
                               configuration=args.configuration, adapt_architecture=args.adapt_architecture,
                               overwrite=args.overwrite)
    print(result.report)
    for change in result.changes:
        print(f"changed in the plans: {change}")
    print(f"{'replaced' if result.replaced else 'wrote'} {result.plans_file}")
    print(f"now train with:  {result.command}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from nnunet_trainers.study import run_study

    inits = []
    for spec in args.init or []:
        name, sep, path = spec.partition("=")
        if spec == "scratch" or (sep and path in ("", "none")):
            inits.append((name, None))
        elif not sep or not name or not path:
            raise Med3DInsightError(f"--init {spec!r}: use 'scratch' or NAME=CHECKPOINT")
        else:
            inits.append((name, path))
    result = run_study(args.dataset, inits, args.output, configuration=args.configuration, labelled=args.labelled,
                       seeds=args.seeds, fold=args.fold, plans=args.plans, epochs=args.epochs,
                       iterations=args.iterations, device=_device(args.device), reference=args.reference == "nnunet",
                       log=lambda line: print(line, flush=True), dry_run=args.dry_run)
    if args.dry_run:
        return 0
    print(f"{result.trained} runs trained, {result.skipped} already finished; see {result.summary_md}")
    return 0


def _slice_settings(args: argparse.Namespace, size: Optional[int] = None):
    from .slices import RenderSettings, SlicePolicy

    policy = SlicePolicy(per_plane=args.per_plane, planes=tuple(args.planes), min_foreground=args.min_foreground)
    render = RenderSettings(size=size or getattr(args, "size", 224), ct_window=tuple(args.ct_window),
                            mri_percentiles=tuple(args.mri_percentiles), channel=args.channel)
    return policy, render


def _source(args: argparse.Namespace):
    from .volumes import open_source

    if args.crops < 0:
        raise Med3DInsightError(f"--crops {args.crops}: pass a positive number of crops per volume, or leave --crops "
                                f"out (or 0) for whole volumes")
    if not args.crops and (args.crop_mm is not None or args.crop_seed):
        given = "--crop-mm" if args.crop_mm is not None else "--crop-seed"
        raise Med3DInsightError(f"{given} goes with --crops N (N >= 1 crops per volume) but --crops is 0 (the "
                                f"default: whole volumes); pass --crops N, or drop {given}")
    if args.crops and args.crop_mm is None:
        raise Med3DInsightError("--crops needs --crop-mm S P L (the crops' size in mm: superior, posterior, left)")
    source = open_source(args.data, modality=args.modality, configuration=args.configuration, plans=args.plans,
                         raw=args.raw)
    if args.crops:
        from .crops import CropSource

        source = CropSource(source, args.crops, args.crop_mm, args.crop_seed)
    return source


def _cmd_slices(args: argparse.Namespace) -> int:
    from .slices import write_slice_pngs

    policy, render = _slice_settings(args)
    files = write_slice_pngs(_source(args), args.output, policy, render, max_cases=args.cases)
    print(f"wrote {len(files)} PNGs to {args.output} (axial: anterior up; coronal/sagittal: head up; "
          f"patient's left on the image's right)")
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    from .distributed import init_distributed
    from .teacher.captioner import (
        Captioner,
        caption_dataset,
        check_generation_args,
        hold_caption_lock,
        load_prompts,
        load_vlm,
    )

    if args.from_labels is None and args.class_names is not None:
        raise Med3DInsightError("--class-names goes with --from-labels (a VLM names what it sees)")
    if args.from_labels is not None and args.prompts is not None:
        raise Med3DInsightError("--prompts goes with --vlm; --from-labels writes its captions without prompts")
    if args.from_labels is None and not (args.with_plane and args.with_position):
        raise Med3DInsightError(f"{'--no-plane' if not args.with_plane else '--no-position'} goes with --from-labels; "
                                f"with --vlm, leave the plane and position out of the prompts (--prompts)")
    policy, render = _slice_settings(args)
    source = _source(args)
    if args.from_labels is not None:
        from .teacher.label_captions import caption_from_labels

        result = caption_from_labels(source, args.from_labels, args.output, policy, render,
                                     class_names=args.class_names, with_plane=args.with_plane,
                                     with_position=args.with_position)
        changed, n = "", len(result.relabelled)
        if n:  # label files changed in place since they were captioned: those cases were captioned again
            shown = ", ".join(result.relabelled[:3]) + (f" and {n - 3} more" if n > 3 else "")
            changed = f" ({result.replaced} old captions replaced: the label file{'s' * (n > 1)} of {shown} changed)"
        print(f"{args.output}: {result.written} captions written, {result.skipped} already there{changed}")
        return 0
    check_generation_args(args.batch_size, args.max_new_tokens)  # before a 7B model loads
    prompts = load_prompts(args.prompts) if args.prompts else None
    with init_distributed(args.device, option="--device") as ctx:  # under torchrun: this process's GPU
        with hold_caption_lock(args.output, ctx):  # before the model loads: a second run on -o fails at once
            vlm = load_vlm(args.vlm, device=str(ctx.device), dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code)
            captioner = Captioner(vlm, prompts=prompts, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens)
            r = caption_dataset(source, captioner, args.output, policy, render,
                                settings={"model": args.vlm, "max_new_tokens": args.max_new_tokens})
    if r.rank == 0:
        rate = r.written / r.seconds if r.seconds > 0 else 0.0
        print(f"{args.output}: {r.written} captions written, {r.skipped} already there ({r.captions} in the "
              f"file; {r.world} process(es), {r.seconds:.2f} s, {rate:.2f} captions/s)")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from .distributed import init_distributed
    from .teacher import build_teacher
    from .teacher.embed import _check_map_size, embed_dataset

    policy, render = _slice_settings(args, size=224)
    _check_map_size(args.feature_maps)  # before any model loads
    source = _source(args)
    with init_distributed(args.device, option="--device") as ctx:  # under torchrun: this process's GPU
        precision = args.precision if args.precision != "auto" else ("bf16" if ctx.device.type == "cuda" else "fp32")
        teacher = build_teacher(args.image_model, args.image_weights, args.text_model, clip_model=args.clip_model,
                                clip_pretrained=args.clip_pretrained, device=str(ctx.device), precision=precision,
                                trust_remote_code=args.trust_remote_code)
        r = embed_dataset(source, args.output, teacher, policy, render, captions=args.captions,
                          batch_size=args.batch_size, cases_per_shard=args.cases_per_shard,
                          feature_maps=args.feature_maps)
    if r.rank == 0:
        print(f"{r.folder}: {r.cases} cases, {r.shards_written} shard(s) written here, {r.shards_kept} "
              f"kept from an earlier run, {r.seconds} s")
    return 0


def _cmd_cache_verify(args: argparse.Namespace) -> int:
    from .teacher.cache import read_manifest, verify_cache

    problems = verify_cache(args.cache)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"med3dinsight cache verify: error: {len(problems)} problem(s) in {args.cache}", file=sys.stderr)
        return 2
    m = read_manifest(args.cache)
    rows = sum(s["rows"] for s in m["shards"])
    teacher = m["settings"]["teacher"]
    text = teacher.get("text_model") if isinstance(teacher.get("text_model"), dict) else None
    maps = m["settings"].get("feature_maps")
    print(f"{args.cache}: ok, {len(m['shards'])} shard(s), {len(m['cases'])} cases, {rows} slices, teacher "
          f"{teacher['model']} ({teacher['embed_dim']}-d)"
          + (f" + text {text.get('model')} ({teacher.get('text_dim')}-d)" if text else "")
          + f", captions: {'yes' if m['settings']['captions'] else 'no'}"
          + (f", feature maps {maps}x{maps}" if maps else ""))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain.config import describe_config, load_config
    from .pretrain.run import run_pretraining

    shortcuts = {"data.source": args.data, "data.cache": args.cache, "output": args.output,
                 "model.backbone": args.backbone, "train.steps": args.steps, "train.device": args.device}
    overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(args.set or [])
    config = load_config(args.config, overrides)
    if args.print_config:  # nothing is read or written: no data, cache or output needed
        print(describe_config(config), end="")
        return 0
    result = run_pretraining(config, resume=not args.no_resume)
    if result.checkpoint:
        print(f"pretrained checkpoint: {result.checkpoint}")
        out = Path(result.output)  # what this run wrote (tensorboard/ only with TensorBoard installed)
        names = ("config.yaml", "metrics.jsonl", "metrics.png", "tensorboard", "checkpoints")
        written = [name + "/" * (out / name).is_dir() for name in names if (out / name).exists()]
        print(f"run folder: {result.output} ({', '.join(written)})")
        if result.eval:
            e = result.eval
            print("held-out retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in e.items() if k.endswith(("top1",
                                                                                                   "top5", "gap"))))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, device=_device(args.device), steps=args.steps)
    return 0


_DEVICES = "auto, cpu, cuda or cuda:N"


def _device_name(value: str) -> str:
    """argparse type of every ``--device``: the same names in every command (checked against the machine when the
    command runs, not while parsing: probing CUDA imports torch)."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"must be {_DEVICES}, got {short_repr(value)}")


def _add_device(p: argparse.ArgumentParser, default: Optional[str] = "auto", what: str = "") -> None:
    shown = "the configuration's train.device (default auto)" if default is None else default
    p.add_argument("--device", type=_device_name, default=default, metavar="DEVICE",
                   help=f"{_DEVICES}; auto = cuda when available (default: {shown}){what}")


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The volumes and the slices of them the teacher sees: shared by slices, caption and embed."""
    p.add_argument("data", help="a folder of NIfTI volumes, an nnU-Net raw dataset or an nnU-Net preprocessed dataset")
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mri"],
                   help="how slices are windowed: ct (Hounsfield window), mri (percentiles); auto reads nnU-Net's "
                        "dataset.json channel name, else guesses from the intensities (default auto)")
    p.add_argument("-c", "--configuration", default="3d_fullres",
                   help="nnU-Net preprocessed data: the configuration (default 3d_fullres)")
    p.add_argument("--plans", default="nnUNetPlans", help="nnU-Net preprocessed data: plans name (default nnUNetPlans)")
    p.add_argument("--raw", help="nnU-Net preprocessed data: the raw dataset it was made from, whose Hounsfield units "
                                 "the teacher sees (default $nnUNet_raw/<dataset_name> when it exists)")
    p.add_argument("--crops", type=int, default=0, metavar="N",
                   help="N fixed crops per volume, each a case CASE@m whose slices show only the crop (default 0: "
                        "whole volumes); pretrain with the same data.crops, data.crop_mm, data.crop_seed")
    p.add_argument("--crop-mm", type=float, nargs=3, metavar=("S", "P", "L"),
                   help="with --crops: the crops' size in mm (superior, posterior, left), e.g. the patch x spacing")
    p.add_argument("--crop-seed", type=int, default=0, help="with --crops: the seed that places the crops")
    p.add_argument("--per-plane", type=int, default=16, help="slices per plane and volume (default 16)")
    p.add_argument("--planes", nargs="+", default=["axial", "coronal", "sagittal"], metavar="PLANE",
                   help="planes to slice: axial, coronal, sagittal (default all three)")
    p.add_argument("--min-foreground", type=float, default=0.05,
                   help="skip slices with less body than this fraction (default 0.05)")
    p.add_argument("--ct-window", nargs=2, type=float, default=[40.0, 400.0], metavar=("CENTRE", "WIDTH"),
                   help="CT window in HU (default soft tissue: 40 400)")
    p.add_argument("--mri-percentiles", nargs=2, type=float, default=[0.5, 99.5], metavar=("LOW", "HIGH"),
                   help="MRI: the intensity percentiles mapped to black and white (default 0.5 99.5)")
    p.add_argument("--channel", type=int, default=0, help="input channel to render (default 0)")


_SHOWN = {"format", "format_version", "backbone", "network_class", "in_channels", "patch_size", "encoder_prefixes",
          "adaptation_plan", "aliases"}


def _command(sub, name: str, func, help: str, description: str = "") -> argparse.ArgumentParser:
    """One sub-command: its one-line ``help`` (in the command list) and its ``description`` (its own --help, which
    starts with the help line); usage errors are one line and exit code 2 like every other error."""
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + "." + (f"\n\n{description}"
                                                                                          if description else ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    _one_line_usage_errors(p)
    return p


def _parser_demo(sub) -> None:
    p = _command(sub, "demo", _cmd_demo, "the whole method on generated data with tiny local teachers (CPU: minutes)",
                 "Generates CT-like volumes and tiny random teachers (no download), then captions, embeds, pretrains\n"
                 "an nnU-Net PlainConvUNet and a MONAI SwinUNETR, exports, and fine-tunes with nnUNetv2_train\n"
                 "-tr Med3DInsightTrainer_smoke and a MONAI loop; prints each load report and where outputs went.")
    p.add_argument("-o", "--output", default="med3dinsight_demo", help="a new folder (default ./med3dinsight_demo)")
    _add_device(p)
    p.add_argument("--steps", type=int, default=12, help="pretraining steps (default 12)")


def _parser_slices(sub) -> None:
    p = _command(sub, "slices", _cmd_slices, "write PNGs of the slices the teacher will see, to check "
                 "orientation/window",
                 "Axial: anterior up; coronal/sagittal: head up; the patient's left on the image's right; physical\n"
                 "aspect ratio; CT window or MRI percentiles as caption and embed will use them.")
    _add_data_arguments(p)
    p.add_argument("-o", "--output", required=True, help="folder for the PNGs")
    p.add_argument("--cases", type=int, default=3, help="how many cases (default 3)")
    p.add_argument("--size", type=int, default=224, help="image size in pixels (default 224)")


def _parser_caption(sub) -> None:
    p = _command(sub, "caption", _cmd_caption, "caption slices with a Hugging Face vision-language model "
                 "(torchrun-shardable), or from label masks (resumable JSONL)",
                 "One caption per selected slice into a JSONL file; a rerun resumes; under torchrun each process\n"
                 "captions its share on its own GPU.")
    _add_data_arguments(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--vlm", help="hub id or local folder of an image-text-to-text model")
    how.add_argument("--from-labels", metavar="LABELS",
                     help="no model: captions from label masks, one file per case (CASE.nii.gz, e.g. nnU-Net's "
                          "labelsTr or TotalSegmentator's): the structures each slice cuts, their size and side")
    p.add_argument("--class-names", metavar="FILE",
                   help="with --from-labels: JSON of label names ({\"1\": \"spleen\"}, nnU-Net's dataset.json or "
                        "{\"liver\": 1}); default: the dataset.json next to LABELS, else 'label N'")
    p.add_argument("--no-plane", dest="with_plane", action="store_false",
                   help="with --from-labels: do not name the slice's plane (nor the body region or the structures' "
                        "sides, which would still tell it); the pretraining model is given the plane anyway")
    p.add_argument("--no-position", dest="with_position", action="store_false",
                   help="with --from-labels: do not locate the slice (no %% of the scan height, no mm from the "
                        "midline); the pretraining model is given the position anyway")
    p.add_argument("-o", "--output", required=True, help="captions .jsonl (resumed if it exists)")
    p.add_argument("--prompts", help="JSON/YAML file of prompt templates (keys like 'ct.axial', 'mri.*', '*')")
    p.add_argument("--batch-size", type=int, default=8, help="slices per generate() call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest caption in tokens (default 96)")
    p.add_argument("--size", type=int, default=448, help="rendered image size for the VLM (default 448)")
    _add_device(p, what="; under torchrun each process takes its local GPU")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: bf16 on CUDA)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def _parser_embed(sub) -> None:
    p = _command(sub, "embed", _cmd_embed, "embed slices (and captions) with a teacher (open_clip, or a timm image "
                 "model and a text encoder) into a cache (torchrun-shardable, resumable)",
                 "The teacher cache pretraining reads: one image embedding (and text embedding of its caption, and\n"
                 "on request a spatial feature map) per slice, in shards; the same files for any number of\n"
                 "processes; a rerun keeps finished shards.")
    _add_data_arguments(p)
    p.add_argument("-o", "--output", required=True, help="cache folder")
    p.add_argument("--clip-model", help="open_clip model: hf-hub:ID, a local open_clip folder, or an architecture name "
                                        "(default BiomedCLIP: hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_"
                                        "patch16_224)")
    p.add_argument("--clip-pretrained", help="pretrained tag or local weight file for an architecture name")
    p.add_argument("--image-model", metavar="timm:NAME",
                   help="a timm image model as the teacher instead of open_clip (weights from --image-weights)")
    p.add_argument("--image-weights", metavar="FILE",
                   help="its local weights: safetensors or a torch file loadable with weights_only=True (names, or "
                        "failing that tensor shapes in order, must match the architecture)")
    p.add_argument("--text-model", metavar="PATH",
                   help="a transformers text encoder (folder or hub id) for the captions, mean-pooled; needed for "
                        "captions with --image-model, optional beside open_clip")
    p.add_argument("--trust-remote-code", action="store_true", help="let the text model's repository run its code")
    p.add_argument("--feature-maps", type=int, metavar="S",
                   help="also store each slice's S x S spatial feature map on its canonical axes (timm or open_clip "
                        "ViT teachers; S <= 32; C*S*S*2 bytes per slice, 125 KB for EfficientNet-Lite0 at 7); "
                        "default: none")
    p.add_argument("--captions", help="caption JSONL from med3dinsight caption (omit for image embeddings only)")
    p.add_argument("--batch-size", type=int, default=64, help="slices per teacher forward pass (default 64)")
    p.add_argument("--cases-per-shard", type=int, default=32, help="cases per cache shard file (default 32)")
    _add_device(p, what="; under torchrun each process takes its local GPU")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: bf16 on CUDA, else fp32")


def _parser_cache(sub) -> None:
    p = _command(sub, "cache", None, "teacher cache tools",
                 "verify: check every shard of a cache med3dinsight embed wrote.")
    actions = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    q = _command(actions, "verify", _cmd_cache_verify, "check every shard of a teacher cache",
                 "Each shard present, of the manifest's size and checksum, readable, with consistent rows and\n"
                 "finite unit-norm embeddings; one line per problem and exit code 2, else a summary line.")
    q.add_argument("cache", help="the cache folder med3dinsight embed wrote")


def _parser_pretrain(sub) -> None:
    p = _command(sub, "pretrain", _cmd_pretrain, "pretrain a backbone on your volumes with a teacher cache "
                 "(torchrun for several GPUs; resumes a run folder)",
                 "Settings come from --config (YAML with sections data, model, train, output), then --set, then the\n"
                 "shortcut options below, later ones winning. A list value in --set is YAML: model.patch_size=\n"
                 "[96,96,96]. Rerunning the same command resumes the run folder. --print-config lists every key.")
    p.add_argument("--config", help="YAML configuration (sections data, model, train, output)")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="override config keys, e.g. train.lr=3e-4 model.patch_size=[96,96,96] (repeatable; a later "
                        "value of the same key wins)")
    p.add_argument("--data", help="= data.source: NIfTI folder, nnU-Net raw or preprocessed dataset")
    p.add_argument("--cache", help="= data.cache: the teacher cache from med3dinsight embed")
    p.add_argument("-o", "--output", help="= output: the run folder")
    p.add_argument("--backbone", help="= model.backbone: swin_unetr, unetr, nnunet, plain_conv_unet, resenc_unet")
    p.add_argument("--steps", type=int, help="= train.steps")
    _add_device(p, default=None, what="; = train.device")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    p.add_argument("--print-config", action="store_true",
                   help="print every configuration key with its value (the defaults, or --config/--set's) and its "
                        "meaning, as YAML to save, edit and pass back with --config; then exit without running")


def _parser_export(sub) -> None:
    p = _command(sub, "export", _cmd_export, "write a checkpoint in the format nnU-Net, MONAI or nnssl loads "
                 "unmodified",
                 "nnunet: a file for nnUNetv2_train -pretrained_weights; monai: the SwinUNETR / UNETR state dict\n"
                 "without the segmentation head, for the MONAI network's load_state_dict; nnssl: an nnssl checkpoint\n"
                 "with its adaptation plan.")
    p.add_argument("checkpoint", help="a med3dinsight .safetensors checkpoint, or hf-hub:ORG/REPO[@REVISION]")
    p.add_argument("--to", required=True, choices=["nnunet", "monai", "nnssl"], help="the target format")
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument("--plans", help="nnunet: the target dataset's plans.json, to check the export fits it")
    p.add_argument("-c", "--configuration", default="3d_fullres",
                   help="nnunet: the configuration in --plans (default 3d_fullres)")


def _parser_inspect(sub) -> None:
    p = _command(sub, "inspect", _cmd_inspect, "print what a checkpoint holds (any supported format)",
                 "Reads the header and tensor shapes only (no tensor data): format, backbone, architecture,\n"
                 "encoder prefixes and the pretraining metadata.")
    p.add_argument("checkpoint", help="a checkpoint file, or hf-hub:ORG/REPO[@REVISION]")


def _parser_push(sub) -> None:
    p = _command(sub, "push", _cmd_push, "publish a checkpoint on the Hugging Face Hub with a model card "
                 "(load it as hf-hub:ORG/REPO)",
                 "Uploads med3dinsight.safetensors and a README.md model card; local paths in the metadata are\n"
                 "published as their last component unless --keep-paths.")
    p.add_argument("checkpoint", help="a med3dinsight .safetensors checkpoint")
    p.add_argument("repo", metavar="ORG/REPO", help="the Hub model repository (created if missing)")
    p.add_argument("--revision", help="branch to commit to (created if missing; default the main branch)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", metavar="FOLDER",
                   help="write med3dinsight.safetensors and README.md (the model card) to FOLDER, a new or empty "
                        "folder or an earlier dry run's; upload nothing")
    p.add_argument("--keep-paths", action="store_true",
                   help="publish the local paths of the checkpoint's metadata (data.root, the run's data and output "
                        "folders, a local teacher) as they are; by default the card and the uploaded file carry only "
                        "their last component")


def _parser_nnunet_env(sub) -> None:
    _command(sub, "nnunet-env", _cmd_nnunet_env, "print the export line that lets nnU-Net find the Med3DInsight "
             "trainers (use: eval \"$(med3dinsight nnunet-env)\")",
             "nnU-Net 2.8 finds trainers outside its package through nnUNet_extTrainer; the line adds this\n"
             "package's trainer folder to what the variable already holds.")


def _parser_nnunet_attach(sub) -> None:
    p = _command(sub, "nnunet-attach", _cmd_nnunet_attach, "write nnU-Net plans that carry a pretrained checkpoint",
                 "Test-loads the checkpoint into the network the plans build, then writes PLANS__med3dinsight next\n"
                 "to them; train with nnUNetv2_train DATASET CONFIGURATION FOLD -tr Med3DInsightTrainer -p NAME.")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans to start from (default nnUNetPlans)")
    p.add_argument("--checkpoint", help="the pretrained checkpoint: a file, or hf-hub:ORG/REPO[@REVISION] (required)")
    p.add_argument("-n", "--name", help="name of the new plans (default PLANS__med3dinsight)")
    p.add_argument("-c", "--configuration", default="3d_fullres",
                   help="the nnU-Net configuration the checkpoint is for (default 3d_fullres)")
    p.add_argument("--adapt-architecture", action="store_true",
                   help="train the checkpoint's architecture (required for SwinUNETR / UNETR checkpoints)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing plans file of that name (the plans you start from are never replaced; "
                        "plans an earlier nnunet-attach wrote from the same -p are replaced without it)")


def _parser_study(sub) -> None:
    p = _command(sub, "study", _cmd_study, "compare initialisations (scratch, checkpoints) with nnUNetv2_train on "
                 "nested labelled subsets of an nnU-Net dataset",
                 "Trains every init x labelled count x seed with nnUNetv2_train and compares them on the held-out\n"
                 "fold's per-case Dice: paired differences, intervals that state their n (none from fewer than 5\n"
                 "units), Holm-corrected p values; resumable.")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name (planned and preprocessed)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans to start from (default nnUNetPlans)")
    p.add_argument("--init", action="append", metavar="scratch|NAME=CHECKPOINT",
                   help="an initialisation to compare (repeat): scratch, or NAME=CHECKPOINT")
    p.add_argument("--reference", choices=["nnunet"], help="add nnU-Net's default nnUNetTrainer recipe as a row")
    p.add_argument("--labelled", nargs="+", default=["all"], help="labelled training cases per run: counts or all")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="one nested subset sequence (and training seed) per seed, 0 to 2**32-1; the "
                        "summary gives intervals from 5 seeds on")
    p.add_argument("--fold", type=int, default=0, help="the fold whose validation cases are held out (default 0)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the trainer's 1000)")
    p.add_argument("--iterations", type=int,
                   help="training iterations per epoch (default 250; validation scaled alike)")
    _add_device(p, what="; cuda:N trains on GPU N")
    p.add_argument("-o", "--output", required=True, help="study folder (resumable: finished runs are skipped)")
    p.add_argument("--dry-run", action="store_true", help="check the checkpoints, write the runs' plans, list the "
                                                          "runs; train nothing")


def _parser_models(sub) -> None:
    p = _command(sub, "models", _cmd_models, "build each backbone + PSAT on random data; print shapes and parameter "
                 "counts",
                 "A dry run of the networks: input -> tokens -> PSAT prediction and the reconstruction, with their\n"
                 "parameter counts, the loss terms and the time of the forward pass.")
    p.add_argument("--backbones", nargs="+", metavar="NAME",
                   help="backbones to build (default: swin_unetr unetr plain_conv_unet resenc_unet)")
    p.add_argument("--patch-size", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"),
                   help="input patch in voxels (default 64 64 64)")
    p.add_argument("--batch", type=int, default=2, help="volumes per forward pass (default 2)")
    p.add_argument("--slices", type=int, default=4, help="slices aligned per volume (K)")
    p.add_argument("--psat", default="paper", help="PSAT preset: paper (the authors' configuration) or small")
    _add_device(p)


# in the order a user runs them (the command list of --help shows them so)
_PARSERS = (_parser_demo, _parser_slices, _parser_caption, _parser_embed, _parser_cache, _parser_pretrain,
            _parser_export, _parser_inspect, _parser_push, _parser_nnunet_env, _parser_nnunet_attach, _parser_study,
            _parser_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="med3dinsight", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Med3DInsight: pretrain a 3D encoder (nnU-Net, SwinUNETR, UNETR) without labels from what 2D\n"
                    "image/text teachers say about its slices, then fine-tune it in nnU-Net or MONAI.\n\n"
                    "The commands in the order you run them: demo (everything on generated data); slices, caption,\n"
                    "embed, cache (the teacher cache of your volumes); pretrain; export, inspect, push (the\n"
                    "checkpoint; push publishes it on the Hugging Face Hub); nnunet-env, nnunet-attach, study\n"
                    "(fine-tuning with nnU-Net); models (sizes of the networks). Wherever a checkpoint is asked\n"
                    "for, hf-hub:ORG/REPO[@REVISION] reads one from the Hub through the Hugging Face cache\n"
                    "(HF_HUB_OFFLINE=1: from the cache only). As in nnU-Net, -c is the configuration everywhere;\n"
                    f"--device takes {_DEVICES} in every command.",
        epilog="A user error ends with one line and exit code 2; MED3DINSIGHT_DEBUG=1 shows its traceback.")
    parser.add_argument("--version", action="version", version=f"med3dinsight {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


def _one_line_usage_errors(parser: argparse.ArgumentParser) -> None:
    """Report ``parser``'s usage errors (e.g. neither or both of two exclusive options) as one line and exit code 2,
    like every other error of the command, instead of argparse's usage block."""
    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error


def _device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other names unchanged. Resolved when a command runs, not
    while the parser is built (probing CUDA imports torch and costs seconds, also for ``--help``)."""
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# Known third-party noise that every run would print and that says nothing about the user's run: a deprecation
# inside timm (imported by open_clip). Filtered for the command line only; the library leaves warnings alone.
_NOISY_WARNINGS = [(FutureWarning, r"`torch\.jit\.interface` is deprecated")]


@contextlib.contextmanager
def _quiet_third_parties(debug: bool):
    """Silence :data:`_NOISY_WARNINGS` while a command runs (not with debug on)."""
    with warnings.catch_warnings():
        if not debug:
            for category, message in _NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
        yield


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = os.environ.get("MED3DINSIGHT_DEBUG", "") not in ("", "0")
    try:
        with _quiet_third_parties(debug):
            return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        _say(f"med3dinsight {args.command}: interrupted; run the same command again to resume")
        return 130
    except (Med3DInsightError, OSError) as e:  # a user error; anything else is a bug and keeps its traceback
        if debug:
            raise
        _say(f"med3dinsight {args.command}: error: {first_line(e)}")
        return 2


def _say(line: str) -> None:
    """One line to stderr in ONE write: under torchrun every rank may report the same error at the same moment, and
    ``print``'s separate write of the newline lets their lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
