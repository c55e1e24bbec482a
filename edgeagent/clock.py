"""Boot identity and the wall-clock offset of this boot's monotonic clock.

Records keep monotonic times (CLOCK_MONOTONIC, the clock of kernel log
timestamps) and a boot id. Wall time = monotonic + offset, where offset =
CLOCK_REALTIME - CLOCK_MONOTONIC as best known. A device without an RTC boots
at 1970; once NTP sets the clock the offset jumps, and chunks encoded before
the jump are corrected at upload (guarantee 7) by `UploaderContext.corrected`,
the one place that shifts times.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# A wall clock earlier than this cannot be right: this release did not exist yet.
PLAUSIBLE_AFTER_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z


def boot_id(path: Path = BOOT_ID_PATH) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        # No procfs (odd containers): a stable stand-in per boot is not
        # available, so every start is treated as a new boot.
        return "unknown-" + str(time.time_ns())


def monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class ClockState(NamedTuple):
    offset_ns: int  # CLOCK_REALTIME - CLOCK_MONOTONIC
    synced: bool  # the wall clock can be trusted


class Clock:
    """Answers "what is the wall time of monotonic instant t on this boot".

    The wall clock counts as established once it reads later than this
    release's date. The kernel's NTP flag (adjtimex) is not used: VMs and
    devices with a battery-backed RTC have a right clock that no NTP daemon
    disciplines, and marking all their records would be wrong. A clock
    restored to a plausible but stale time (fake-hwclock) cannot be told from
    a right one; its records are corrected at upload if the offset later moves
    by more than `JUMP_NS` (NTP stepping it): `UploaderContext.corrected`
    compares each chunk's offset with the live state of this boot, or the last
    stored offset of an earlier boot.
    """

    JUMP_NS = 1_000_000_000

    def state(self) -> ClockState:
        offset = time.time_ns() - monotonic_ns()
        return ClockState(offset, monotonic_ns() + offset >= PLAUSIBLE_AFTER_NS)
