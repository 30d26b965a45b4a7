"""A test hook: die with SIGKILL at the N-th step of publishing or recovering.

``UNPACKED_CRASH_AT=N`` kills the process at the N-th call of ``point`` (counted per process);
``UNPACKED_CRASH_LOG=FILE`` records each step's label, so a test can drive a run through every
step of a publish or of a recovery and check what the disk holds at each one. Unset, it costs
one environment lookup.
"""

from __future__ import annotations

import os
import signal

_steps = [0]


def point(label: str) -> None:
    at = os.environ.get("UNPACKED_CRASH_AT")
    if not at:
        return
    _steps[0] += 1
    record = os.environ.get("UNPACKED_CRASH_LOG")
    if record:
        with open(record, "a") as f:
            f.write(f"{_steps[0]} {label}\n")
    if str(_steps[0]) == at:
        os.kill(os.getpid(), signal.SIGKILL)
