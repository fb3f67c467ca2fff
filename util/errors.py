class UserError(Exception):
    """An error the user caused (bad file, flag or format); printed as one line, no traceback."""


def run_cli(main):
    """Run a command's `main()` as a script: a UserError becomes one `error: ...` line and exit code 2."""
    import sys

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or metric: the run stops (exit 3) without writing a checkpoint after it."""
