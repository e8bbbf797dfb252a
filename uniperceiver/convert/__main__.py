"""python -m uniperceiver.convert --from {official,deepspeed,official-dense} IN OUT [options]
python -m uniperceiver.convert --to official IN OUT
python -m uniperceiver.convert --consolidate DCP_DIR OUT.pt
python -m uniperceiver.convert --export-task TASK_TYPE IN OUT

--from writes a file that `UniPerceiver.from_pretrained` loads. Model sizes come from the tensor
shapes; what shapes cannot tell (heads, or a resolution other than the checkpoint's) comes from
`--num-heads` or `--set key=value` (model config keys, e.g. image_size=224 posembed_scale=0.7142857).
--to official writes our model file IN as an official checkpoint (for the release's code) and
prints the --from command that converts it back to IN.
--consolidate writes the single model file (every expert) of a sharded run's distributed
checkpoint directory (or of a run directory: its newest complete checkpoint).
--export-task writes a model for one task type (e.g. image_classification) whose MoE sublayers
hold one merged weight set per attribute row the task uses (no gates, no unused experts); its
outputs on that task equal IN's. Refused (exit 2) for routers that depend on the tokens.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .. import cli
from .api import convert_file
from .export import export_official_file


def _convert(argv: list[str]) -> int:
    from ..config import ModelConfig

    keys = "\n".join(line.replace("  ", "  model.", 1) for line in cli.config_keys(ModelConfig))
    parser = argparse.ArgumentParser(
        prog="python -m uniperceiver.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 ok, 2 bad input (file, format, key), 3 failed. --debug: full traceback.\n\n"
               f"Config keys it reads (--set, without the 'model.' prefix):\n{keys}")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="fmt", choices=["official", "deepspeed", "official-dense"])
    direction.add_argument("--to", dest="to", choices=["official"], help="our model file -> an official checkpoint")
    direction.add_argument("--consolidate", action="store_true",
                           help="IN is a distributed (DCP) training checkpoint directory: write its full model")
    direction.add_argument("--export-task", dest="task", metavar="TASK_TYPE",
                           help="our MoE model file -> a model for one task type with merged experts")
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
    args = parser.parse_args(argv)  # usage errors exit 2 (argparse), like every bad input
    if args.to is not None:
        return _export(args.input, args.output)
    if args.consolidate:
        return _consolidate(args.input, args.output)
    if args.task is not None:
        return _export_task(args.task, args.input, args.output)
    try:
        report = convert_file(args.input, args.output, args.fmt, num_heads=args.num_heads,
                              overrides=args.set, fold_visual_type=args.fold)
    except ValueError as exc:  # the converter's strict checks: a file that is not what --from says
        raise cli.BadInputError(str(exc)) from exc
    print(report)
    print(f"wrote {args.output}")
    return 0


def _export(src: str, dst: str) -> int:
    try:
        back = export_official_file(src, dst)
    except ValueError as exc:  # not a model file this can export
        raise cli.BadInputError(str(exc)) from exc
    print(f"wrote {dst}")
    print("back: python -m uniperceiver.convert " + " ".join(shlex.quote(a) for a in back))
    return 0


def _consolidate(directory: str, output: str) -> int:
    from ..engine.dcp import consolidate

    try:
        report = consolidate(directory, output)
    except ValueError as exc:  # not a complete distributed checkpoint
        raise cli.BadInputError(str(exc)) from exc
    print(report)
    print(f"wrote {output}")
    return 0


def _export_task(task: str, src: str, dst: str) -> int:
    from .task_export import export_task_file

    try:
        moe_params, task_params, sets = export_task_file(src, dst, task)
    except ValueError as exc:  # an unknown task type, a token router, a file that is not a model
        raise cli.BadInputError(str(exc)) from exc
    print(f"MoE model {src}: {moe_params:,} parameters")
    print(f"{task} model {dst}: {task_params:,} parameters ({sets} merged weight sets per MoE sublayer, no gates)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_convert, argv, handles_help=True)


if __name__ == "__main__":
    sys.exit(main())
