"""The errors a run reports in one line, and the exit code of each (README: "Exit codes").

| code | meaning                                                        | what to do                        |
|------|----------------------------------------------------------------|-----------------------------------|
| 0    | finished                                                       |                                   |
| 1    | unexpected crash (a traceback)                                 | report it; `--resume auto` resumes |
| 2    | user error: a flag, file or format (one `error:` line)         | fix the command                   |
| 3    | non-finite loss or metric: no checkpoint written after it      | lower --blr, --clip_grad, data    |
| 4    | a checkpoint (or args.json) could not be written               | free space, then resume           |
| 75   | preempted (SIGTERM / SIGUSR1 / SIGINT): checkpoint saved       | requeue: it resumes with no loss  |
"""
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", what a requeue does


class UserError(Exception):
    """An error the user caused (bad file, flag or format); printed as one line, no traceback."""


def run_cli(main):
    """Run a command's `main()` as a script: a UserError becomes one `error: ...` line and exit code 2."""
    import sys

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or metric: the run stops (exit 3) without writing a checkpoint after it."""


class WriteFailed(RuntimeError):
    """A file of the run could not be written (disk full, quota, permissions); the partial file is removed and
    the previous version left intact. The run stops with exit 4."""


class Preempted(Exception):
    """A signal asked the run to stop; every rank saved the same checkpoint. Exit 75."""
