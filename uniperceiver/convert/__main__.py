"""python -m uniperceiver.convert --from {official,deepspeed,official-dense} IN OUT [options]

Writes a file that `UniPerceiver.from_pretrained` loads. Model sizes come from the tensor shapes;
what shapes cannot tell (heads, or a resolution other than the checkpoint's) comes from
`--num-heads` or `--set key=value` (model config keys, e.g. image_size=224 posembed_scale=0.7142857).
"""
from __future__ import annotations

import argparse
import sys

from .api import convert_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="fmt", required=True, choices=["official", "deepspeed", "official-dense"])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads (not visible in shapes; default d_model // 64)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model config overrides applied after inference from shapes")
    fold = parser.add_mutually_exclusive_group()
    fold.add_argument("--fold-visual-type", dest="fold", action="store_true", default=None,
                      help="add video_embed.embeddings_type to the patch bias (default for deepspeed)")
    fold.add_argument("--no-fold-visual-type", dest="fold", action="store_false")
    args = parser.parse_args(argv)
    try:
        report = convert_file(args.input, args.output, args.fmt, num_heads=args.num_heads,
                              overrides=args.set, fold_visual_type=args.fold)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
