"""Peak resident memory of this process over a measured stretch of work.

Linux keeps the high-water mark of resident memory (VmHWM); writing 5 to
/proc/self/clear_refs resets it, so the peak of one measured run can be read
apart from whatever the process did before. Elsewhere, the lifetime peak
(getrusage) is the best available and is said to be so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def reset_peak() -> bool:
    """Reset the peak-RSS mark; False where the OS does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set since the last `reset_peak` (Linux) or since start (elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
