"""Whether a process of this machine still runs: how locks, cache entries and search trials left by a killed
process are told from those of a live one."""

from __future__ import annotations

import os


def pid_running(pid: int) -> bool:
    """True if process ``pid`` exists on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
