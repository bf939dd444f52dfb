"""The two kinds of failure a verb reports, and their exit codes (see the README)."""


class UserError(Exception):
    """Something the user can fix before work starts: a key, a value, a file. Exit code 2."""

    exit_code = 2


class WorkError(Exception):
    """A failure during work (diverged loss, failed self-check, out of memory). Exit code 1."""

    exit_code = 1


class Interrupted(WorkError):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint. Exit code 130."""

    exit_code = 130
