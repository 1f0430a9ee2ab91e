"""Error kinds and their exit codes: a user error is one clear line and exit 2; anything else is internal (exit 1)."""


class UserError(Exception):
    """Bad input from the user (path, image, mask, checkpoint, option). The CLI prints it as one line and exits 2."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe or of the wrong architecture."""
