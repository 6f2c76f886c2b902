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
          f"patch {tuple(args.patch_size)}, device {args.device}")
    for name in names:
        s = summarize(name, args.patch_size, args.batch, args.slices, args.device)
        print(f"\n{name} ({s['network']})")
        print(f"  parameters   network {s['network_params'] / 1e6:.2f}M, PSAT {s['psat_params'] / 1e6:.2f}M, "
              f"total {s['total_params'] / 1e6:.2f}M")
        print(f"  input {s['input']} -> tokens {s['tokens']} -> PSAT {s['prediction']}; "
              f"reconstruction {s['reconstruction']}")
        print(f"  losses {s['losses']} ({s['seconds']} s)")
    return 0


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
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_models)
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
        print(f"med3dinsight {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
