"""Process helpers shared by the writers that clean up after killed runs."""

import os


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a temp folder of a dead one may be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
