"""Command-line checks shared by the three training scripts: bad flags end in one line naming the problem.

* `one_line_errors(parser)`: argparse errors without the page-long usage dump, with a did-you-mean for
  misspelt flags (argparse itself suggests nothing before Python 3.14).
* `check_ranges(args, ...)`: sizes, epochs and learning rates that cannot work are rejected before any data
  is read, instead of surfacing as a scheduler assertion or a silent no-op run.
* `check_patch_grid(...)`: an input size the patch size does not divide would be floored silently.
"""
import difflib
import math
import sys
from pathlib import Path


def one_line_errors(parser):
    """Make `parser.error` print `script: error: message; see script --help` and exit 2."""
    flags = [option for action in parser._actions for option in action.option_strings]
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else parser.prog

    def error(message):
        hints = []
        if message.startswith("unrecognized arguments:"):
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
                if word.startswith("-") and close:
                    hints.append(f"{word} -> {close[0]}?")
        hint = f" (did you mean: {', '.join(hints)})" if hints else ""
        sys.stderr.write(f"{script}: error: {message}{hint}; see {script} --help\n")
        sys.exit(2)

    parser.error = error
    return parser


def _dest(flag):
    return flag.lstrip("-").replace("-", "_")


def check_ranges(args, positive=(), non_negative=()):
    """SystemExit naming the first flag (as spelt in `positive` / `non_negative`) whose value is out of range.

    Flags whose value is None (unset optional ones, e.g. ARM's `--lr`) are not checked.
    """
    for flags, allowed, words in ((positive, lambda v: v > 0, "greater than 0"),
                                  (non_negative, lambda v: v >= 0, "0 or more")):
        for flag in flags:
            value = getattr(args, _dest(flag))
            if value is not None and not (allowed(value) and math.isfinite(value)):
                raise SystemExit(f"error: {flag} must be {words if math.isfinite(value) else 'finite'}, got {value}")


def check_multiple(args, flag, of_flag):
    """SystemExit unless `flag`'s value is a multiple of `of_flag`'s (0 counts as one)."""
    value, base = getattr(args, _dest(flag)), getattr(args, _dest(of_flag))
    if value % base:
        raise SystemExit(f"error: {flag} {value} must be a multiple of {of_flag} {base}")


def check_patch_grid(input_size, patch_size, flag):
    """SystemExit when `patch_size` does not divide `input_size` (the border would be dropped silently)."""
    if input_size % patch_size:
        sizes = sorted({max(input_size // patch_size, 1) * patch_size, (input_size // patch_size + 1) * patch_size})
        raise SystemExit(f"error: {flag} {input_size} is not a multiple of the patch size {patch_size}; "
                         f"use {' or '.join(map(str, sizes))}")
