"""Validation of command-line values before any work starts: bounded numbers (an argparse `type`, so a bad
value fails at parse time naming the flag as typed, and values from `--config` are checked the same way),
the output folder (writable, not under a file; nothing is created to find out), and warnings for values
that work but have no effect."""
import argparse
import os

from util.errors import UserError


class Bounded:
    """argparse type: a number of `kind` (int or float) within [low, high]; `open_low` / `open_high` exclude
    the bound. Usable as `type=` and, through check_config_values, on values a YAML config set."""

    def __init__(self, kind, low=None, high=None, *, open_low=False, open_high=False):
        self.kind, self.low, self.high, self.open_low, self.open_high = kind, low, high, open_low, open_high
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages

    def describe(self):
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {self.high}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"

    def problem(self, value):
        """None when `value` is acceptable, else what is wrong with it."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.kind is int and isinstance(value, float) and not value.is_integer()):
            return f"expected {'an integer' if self.kind is int else 'a number'}"
        if value != value:  # NaN
            return "expected a number"
        low_bad = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        return f"must be {self.describe()}" if low_bad or high_bad else None

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}") \
                from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} {problem}")
        return value


def positive_int():
    return Bounded(int, 1)


def non_negative_int():
    return Bounded(int, 0)


def positive_float():
    return Bounded(float, 0, open_low=True)


def non_negative_float():
    return Bounded(float, 0)


def fraction(open_low=False, open_high=False):
    return Bounded(float, 0, 1, open_low=open_low, open_high=open_high)


def check_config_values(parser, args, config_path):
    """Values a `--config` file set bypass argparse's `type`: check every Bounded flag's final value."""
    if not config_path:
        return
    for action in parser._actions:
        if not isinstance(action.type, Bounded) or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        if isinstance(action.nargs, int) and value is not None and (
                not isinstance(value, (list, tuple)) or len(value) != action.nargs):
            raise UserError(f"--config {config_path}: {action.dest}: {value!r} should be a list of {action.nargs} "
                            f"values (flag {action.option_strings[0]})")
        if action.type.kind is int and isinstance(value, float) and value.is_integer():
            setattr(args, action.dest, int(value))  # YAML's 10.0 for an integer flag
            value = int(value)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            problem = None if v is None else action.type.problem(v)
            if problem:
                raise UserError(f"--config {config_path}: {action.dest}: {v!r} {problem} (flag "
                                f"{action.option_strings[0]})")


def check_paths(args, flags):
    """Every file or folder these flags name exists (contents are read once the run starts); `--resume`, when
    given and not 'auto', must be a file or a sharded checkpoint folder. A {000..009} shard pattern is expanded and checked later."""
    for flag in flags:
        path = getattr(args, flag, None)
        if path and not os.path.exists(path) and "{" not in path:
            raise UserError(f"--{flag} {path}: not found")
    resume = getattr(args, "resume", "")
    if resume and resume != "auto" and not os.path.isfile(resume):
        from util.resume import has_own_checkpoint
        from util.sharded_checkpoint import is_sharded

        if is_sharded(resume):
            return

        if not has_own_checkpoint(getattr(args, "output_dir", None)):  # a requeued run needs it no more
            raise UserError(f"--resume {resume}: no such file (a checkpoint file, a sharded checkpoint folder, or 'auto')")


def check_output_dir(path, flag="--output_dir"):
    """One line when `path` cannot become the run's folder: a file, under a file, or not writable (checked on
    the nearest existing folder; nothing is created)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a file, not a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, so no folder can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the folder" if probe == os.path.abspath(path) else f"{probe}, where it would be created,"
        raise UserError(f"{flag} {path}: {what} is not writable by this user (read-only file system or "
                        "permissions); pick another folder")


def no_effect_warnings(args, parser):
    """Values that run but do nothing useful, one sentence each (the run prints them as warnings); a default
    that merely does not apply to a short run is not one of them."""
    out = []
    if args.warmup_epochs >= args.epochs:
        out.append(f"--warmup_epochs {args.warmup_epochs:g} is not shorter than --epochs {args.epochs}: the lr "
                   "rises for the whole run and never reaches --blr/--lr's peak or decays")
    if args.save_per_epochs != parser.get_default("save_per_epochs") and args.save_per_epochs > args.epochs:
        out.append(f"--save_per_epochs {args.save_per_epochs} is more than --epochs {args.epochs}: only the "
                   "final epoch's copy is kept")
    return out
