"""``med3dinsight`` command line: thin argument parsing over the Python API.

Bad input ends with one line on stderr naming what is wrong and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__


def _cmd_models(args: argparse.Namespace) -> int:
    from .backbones import list_backbones
    from .summary import summarize

    names = args.backbones or [n for n in list_backbones() if n != "nnunet"]  # "nnunet" needs a plans file
    print(f"Med3DInsight models on random data: batch {args.batch}, {args.slices} slices per volume, "
          f"patch {tuple(args.patch_size)}, PSAT preset {args.psat!r}, device {args.device}")
    for name in names:
        s = summarize(name, args.patch_size, args.batch, args.slices, args.device, psat=args.psat)
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
    print(f"wrote {result['path']} ({result['format']}, {result['tensors']} tensors)")
    if result["note"]:
        print(f"note: {result['note']}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    params = sum(t.numel() for t in {id(t): t for t in ckpt.state_dict.values()}.values())
    print(f"{ckpt.path}: {ckpt.source_format}, {len(ckpt.state_dict)} network tensors, {params / 1e6:.2f}M values")
    meta = ckpt.metadata
    if ckpt.source_format == "med3dinsight":
        cfg = meta["backbone"]
        print(f"  backbone      {cfg['name']} ({meta['network_class'].rsplit('.', 1)[-1]}), in_channels "
              f"{meta['in_channels']}, patch {tuple(meta['patch_size'])}")
        if "configuration" in cfg:
            print(f"  nnU-Net plans {cfg['plans'].get('plans_name')} of {cfg['plans'].get('dataset_name')}, "
                  f"configuration {cfg['configuration']}")
        print(f"  encoder       {', '.join(meta['encoder_prefixes'])}")
        for key in sorted(set(meta) - _SHOWN):
            print(f"  {key:<13} {meta[key]}")
    elif ckpt.encoder_prefixes:
        print(f"  encoder       {', '.join(ckpt.encoder_prefixes)}")
    return 0


def _cmd_nnunet_env(args: argparse.Namespace) -> int:
    import importlib.util
    import os
    import shlex

    shim = importlib.util.find_spec("nnunet_trainers.ext").submodule_search_locations[0]
    existing = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != shim]
    print(f"export nnUNet_extTrainer={shlex.quote(os.pathsep.join([shim, *existing]))}")
    return 0


def _cmd_nnunet_attach(args: argparse.Namespace) -> int:
    from nnunet_trainers.attach import attach_checkpoint

    result = attach_checkpoint(args.dataset, args.plans, args.checkpoint, name=args.name,
                               configuration=args.configuration, adapt_architecture=args.adapt_architecture)
    print(result["report"])
    for change in result["changes"]:
        print(f"changed in the plans: {change}")
    print(f"wrote {result['plans_file']}")
    print(f"now train with:  {result['command']}")
    return 0


_SHOWN = {"format", "format_version", "backbone", "network_class", "in_channels", "patch_size", "encoder_prefixes",
          "adaptation_plan", "aliases"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="med3dinsight", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"med3dinsight {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="build each backbone + PSAT on random data; print shapes and parameter counts")
    p.add_argument("--backbones", nargs="+", metavar="NAME",
                   help="backbones to build (default: swin_unetr unetr plain_conv_unet resenc_unet)")
    p.add_argument("--patch-size", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--slices", type=int, default=4, help="slices aligned per volume (K)")
    p.add_argument("--psat", default="paper", help="PSAT preset: paper (the authors' configuration) or small")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("export", help="write a checkpoint in the format nnU-Net, MONAI or nnssl loads unmodified")
    p.add_argument("checkpoint", help="a med3dinsight .safetensors checkpoint")
    p.add_argument("--to", required=True, choices=["nnunet", "monai", "nnssl"])
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument("--plans", help="nnunet: the target dataset's plans.json, to check the export fits it")
    p.add_argument("--configuration", default="3d_fullres", help="nnunet: configuration in --plans")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("nnunet-env", help="print the export line that lets nnU-Net find the Med3DInsight trainers "
                                          "(use: eval \"$(med3dinsight nnunet-env)\")")
    p.set_defaults(func=_cmd_nnunet_env)

    p = sub.add_parser("nnunet-attach", help="write nnU-Net plans that carry a pretrained checkpoint")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans to start from (default nnUNetPlans)")
    p.add_argument("-c", "--checkpoint", required=True, help="the pretrained checkpoint")
    p.add_argument("-n", "--name", help="name of the new plans (default PLANS__med3dinsight)")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--adapt-architecture", action="store_true",
                   help="train the checkpoint's architecture (required for SwinUNETR / UNETR checkpoints)")
    p.set_defaults(func=_cmd_nnunet_attach)

    p = sub.add_parser("inspect", help="print what a checkpoint holds (any supported format)")
    p.add_argument("checkpoint")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__  # details (a load report) follow it
        print(f"med3dinsight {args.command}: error: {first_line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
