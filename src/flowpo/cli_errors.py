"""How the command line reports a failure: one line and an exit code (2 bad input, 1 a runtime
failure), never a traceback unless FLOWPO_DEBUG=1."""
from __future__ import annotations


class UsageError(Exception):
    pass


def explain(e: Exception) -> tuple[int, str]:
    """(exit code, one line) for an exception: 2 for bad input, 1 for a runtime failure; the line
    is cut in the middle past flowpo.errors.LINE_LIMIT characters."""
    from flowpo.errors import LINE_LIMIT, abbrev

    code, line = _explain(e)
    return code, abbrev(line, LINE_LIMIT)


def _explain(e: Exception) -> tuple[int, str]:
    from flowpo.config import ConfigError

    from flowpo.training.runlock import RunBusy

    if isinstance(e, (ConfigError, UsageError, RunBusy)):
        return 2, str(e)
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        if e.filename is None:
            return 2, str(e)
        what = {FileNotFoundError: "does not exist", FileExistsError: "already exists",
                NotADirectoryError: "is not a folder (a file is in the way)",
                IsADirectoryError: "is a folder where a file was expected"}[type(e)]
        return 2, f"{e.filename} {what}; check the path you gave"
    if isinstance(e, PermissionError):
        return 2, f"permission denied: {e.filename or e}; choose a path you can write (--out) or read"
    if _disk_full(e):
        where = getattr(e, "filename", None) or "the run folder"
        return 1, (f"no space left on the device while writing {where}; free space and run the command again "
                   "(a training run: flowpo train --resume <its folder>; its earlier checkpoints are intact)")
    if isinstance(e, OSError):
        return 1, f"{type(e).__name__}: {e}"
    from flowpo.rewards import RewardError
    from flowpo.training.distributed import DistributedError

    if isinstance(e, (RewardError, FloatingPointError, DistributedError)):
        return 1, str(e)  # runtime failures whose messages name the fix
    return 1, f"{type(e).__name__}: {e} (an unexpected failure: set FLOWPO_DEBUG=1 for the traceback and report it)"


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, also when a library reports it in its own exception (safetensors' SafetensorError)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return type(e).__name__ == "SafetensorError" and ("code: 28" in text or "StorageFull" in text
                                                       or "No space left" in text)
