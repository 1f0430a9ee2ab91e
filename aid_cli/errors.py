"""Error kinds and their exit codes: a user error is one clear line and exit 2; anything else is internal (exit 1)."""


class UserError(Exception):
    """Bad input from the user (path, image, mask, checkpoint, option). The CLI prints it as one line and exits 2."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe or of the wrong architecture."""


class OfflineError(UserError):
    """A model that is not in the cache while downloads are off (--offline, HF_HUB_OFFLINE=1)."""


class DownloadError(UserError):
    """A download that failed: unreachable source, HTTP error, interrupted transfer, or bytes that fail their sha256."""


def one_line(error: BaseException, prefer: str = "", with_type: bool = False) -> str:
    """The most useful single line of an exception's message: the first line containing `prefer`, else the first
    (the exception's type name when the message is empty); `with_type`: prefixed with the type, `OSError: ...`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = next((line for line in lines if prefer and prefer in line), lines[0])
    return f"{type(error).__name__}: {line}" if with_type else line
