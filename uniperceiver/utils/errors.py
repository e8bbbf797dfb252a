"""What kind of error an exception is, for the exit-code convention (`uniperceiver.cli`).

Error classes across the package mix these in, so the command-line wrapper classifies without
importing every subpackage: `BadInput` -> exit 2 (config, data, checkpoint, missing tool, busy
output directory), `RunFailure` -> exit 3 with a one-line message (non-finite losses, a collective
timeout, a full disk). Anything else is a bug: exit 3 with its traceback.
"""
from __future__ import annotations


class BadInput(Exception):
    """Mixin: the user's input is wrong; the message names the file/key and what was expected."""


class RunFailure(Exception):
    """Mixin: the run could not go on for a reason the message states fully (no traceback needed)."""

    hard_exit = False  # True: leave with os._exit (a peer is gone and teardown could hang)


class BadInputError(ValueError, BadInput):
    """Bad input that no more specific error class describes (e.g. a missing external tool)."""
