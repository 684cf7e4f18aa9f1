"""Kill-point fault injection: die (or fail) at a named point, to prove a run survives it.

    CHATPIPE_FAULT=checkpoint:before-rename python -m stages.pretrain --run-dir runs/tiny

With `CHATPIPE_FAULT=<point>` set, the process calls `os._exit(137)` the first time it reaches
`fault_point("<point>")`: no cleanup, no `finally`, no flushed buffers, the moral equivalent of
`kill -9` at a chosen line. `<point>#N` fires at the Nth time the point is reached in this
process instead of the first; `<point>=enospc` raises `OSError(ENOSPC)` there instead of exiting,
as a full disk would. Points (tests/test_faults.py kills every training stage at each):

    checkpoint:after-weights   a resumable checkpoint's model is written, its optimiser state not yet
    checkpoint:before-rename   a resumable checkpoint is complete in step-N.tmp, not yet renamed
    final:after-weights        the final model's weights are written, its tokenizer not yet
    manifest:before-replace    the new manifest is written to its temp file, not yet renamed over
    token-store:shard-written  a token-store shard's ids are in place, its header not yet

Unset, a fault point costs one dictionary lookup: the variable is read once per process.
"""

from __future__ import annotations

import errno
import functools
import os

ENVIRONMENT_VARIABLE = "CHATPIPE_FAULT"
KILLED_EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL

_hits: dict[str, int] = {}


@functools.lru_cache(maxsize=1)
def _planned() -> tuple[str, int, str] | None:
    """(point, the hit it fires on, action) from the environment, or None."""
    spec = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if not spec:
        return None
    spec, _, action = spec.partition("=")
    point, _, nth = spec.partition("#")
    return point.strip(), int(nth) if nth.strip() else 1, (action.strip() or "kill")


def fault_point(point: str) -> None:
    """Die here (or raise ENOSPC) if CHATPIPE_FAULT names this point and this is the planned hit."""
    planned = _planned()
    if planned is None or planned[0] != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != planned[1]:
        return
    if planned[2] == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENVIRONMENT_VARIABLE} at {point})")
    os._exit(KILLED_EXIT_CODE)
