"""One exit-code convention and error style for every command (train, eval, convert, demo,
benchmarks, tools).

    0  success
    1  a metric pinned in eval.expected was missed (eval only)
    2  bad input: config (file, key, value), data, checkpoint, an unset environment variable, a
       missing external tool (Java for caption metrics), an unknown task name, a busy output dir
    3  the run failed: non-finite losses, a collective that timed out, a full disk, or a bug

Errors print one line, `error: <what, naming the file/key, and what was expected>`; `--debug` (or
UNIPERCEIVER_DEBUG=1) adds the full traceback. An unexpected exception (a bug) always prints it.
`--help` prints the command's usage and the config keys it reads.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import typing
from collections.abc import Callable, Sequence

from .utils.errors import BadInput, BadInputError, RunFailure

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_METRIC_MISSED", "EXIT_OK", "BadInputError", "run"]

EXIT_OK, EXIT_METRIC_MISSED, EXIT_BAD_INPUT, EXIT_FAILED = 0, 1, 2, 3


# Path errors (a file the command was pointed at is missing) are bad input too.
_BAD_PATHS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def is_bad_input(exc: BaseException) -> bool:
    return isinstance(exc, (BadInput, *_BAD_PATHS))


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("UNIPERCEIVER_DEBUG", "") not in ("", "0")


def one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).strip().splitlines() if part.strip())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text or type(exc).__name__


def config_keys(cls: type, prefix: str = "", sections: Sequence[str] | None = None) -> list[str]:
    """`key.path: type = default` for every field of a config dataclass (nested ones expanded),
    limited to the top-level `sections` when given."""
    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init or (sections is not None and not prefix and f.name not in sections):
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines += config_keys(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        from .config.loader import _type_name

        lines.append(f"  {key}: {_type_name(tp)} = {default!r}")
    return lines


def help_text(doc: str, sections: Sequence[str] | None) -> str:
    text = (doc or "").strip()
    if sections is None:
        return text
    from .config import RunConfig, TaskConfig

    keys = config_keys(RunConfig, sections=[s for s in sections if s != "tasks"])
    if "tasks" in sections:
        keys.append("  tasks: a list of tasks, each with (override one with tasks.<name>.<key>=value):")
        keys += ["  " + line for line in config_keys(TaskConfig)]
    return (f"{text}\n\nOptions: --help, --debug (full tracebacks; or UNIPERCEIVER_DEBUG=1).\n"
            f"Exit codes: 0 ok, 1 a pinned metric missed (eval), 2 bad input, 3 the run failed.\n\n"
            f"Config keys it reads (set in the YAML or as key.path=value):\n" + "\n".join(keys))


def run(main: Callable[[list[str]], int], argv: Sequence[str] | None = None, *, doc: str = "",
        sections: Sequence[str] | None = None, handles_help: bool = False) -> int:
    """Call `main(args)` under the convention: `--help` (unless the command's own parser handles
    it), `--debug`, exit codes and one-line errors."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != "--debug"]
    if not handles_help and any(a in ("-h", "--help") for a in args):
        print(help_text(doc, sections))
        return EXIT_OK
    try:
        return main(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 -- classified below
        if isinstance(exc, SystemExit):
            raise
        bad = is_bad_input(exc)
        if debug or not (bad or isinstance(exc, RunFailure)):
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT if bad else EXIT_FAILED
        if getattr(exc, "hard_exit", False):
            # A peer is gone: tearing down the process group (or interpreter exit) could wait on it.
            sys.stdout.flush()
            os._exit(code)
        return code
