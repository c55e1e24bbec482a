"""The state directory itself: its permissions and the run lock.

Owns `state_dir` (the spool inside it belongs to `edgeagent.spool`):
- it is created mode 0700; every file the agent creates in it is 0600 (the
  agent runs with umask 077, the spool sets its own files' modes);
- a `state_dir` that is a symlink, or (when running as root) writable by group
  or others, is refused with a `StateDirError` (exit 2): another user could
  swap the spool or plant files the agent then trusts;
- a `state_dir` on a RAM file system (tmpfs, ramfs) gets a warning: nothing in
  it survives a reboot;
- `state_dir/edgeagent.lock` holds an exclusive `flock` for the life of
  `edgeagent run`, taken before the spool is opened: a second agent on the same
  state dir exits at once, naming the running one's pid. The file holds the
  holder's pid on its first line and, while the spool cannot be opened, the
  reason on its second (read by `edgeagent status`, `spool dump` and `wake`,
  which never take the lock). The lock goes with the process, also on kill -9.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from edgeagent.errors import AlreadyRunning, StateDirError

LOCK_NAME = "edgeagent.lock"
_NOTE_ROOM = 512  # the lock file is written this long at once, so notes fit on a full disk
_RAM_FILESYSTEMS = ("tmpfs", "ramfs")


def prepare(state_dir: Path) -> list[str]:
    """Create or check `state_dir`; returns warnings to log. Raises StateDirError."""
    state_dir = Path(state_dir)
    if state_dir.is_symlink():
        raise StateDirError(
            f"state_dir {state_dir} is a symlink (to {os.readlink(state_dir)}); expected a real directory, "
            "mode 0700, owned by the agent's user"
        )
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(state_dir)
    except OSError as e:
        raise StateDirError(f"state_dir {state_dir}: cannot create it: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state_dir {state_dir} is not a directory; expected a directory, mode 0700")
    if os.geteuid() == 0 and st.st_mode & 0o022:
        raise StateDirError(
            f"state_dir {state_dir} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"expected mode 0700 owned by root (chmod 700 {state_dir})"
        )
    warnings = []
    fs_type = filesystem_type(state_dir)
    if fs_type in _RAM_FILESYSTEMS:
        warnings.append(
            f"state_dir {state_dir} is on {fs_type} (RAM): the spool and positions will not survive a reboot; "
            "set state_dir to a directory on persistent storage"
        )
    return warnings


def filesystem_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (from /proc/self/mountinfo)."""
    best, best_type = "", ""
    target = str(Path(path).resolve())
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                mount_point = parts[4].replace("\\040", " ")
                fs_type = parts[parts.index("-") + 1]
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fs_type
    except (OSError, ValueError, IndexError):
        pass
    return best_type


class RunLock:
    """The exclusive run lock of a state dir (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd = -1
        self._note: str | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning (at once, never waits)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder(self.state_dir)[0]
            raise AlreadyRunning(
                f"another edgeagent (pid {pid if pid else 'unknown'}) is already running on state_dir "
                f"{self.state_dir}; stop it first"
            ) from None
        self._fd = fd
        os.fchmod(fd, 0o600)
        self.note("")

    def note(self, text: str) -> None:
        """Rewrite the lock file: pid, then `text` (why the agent is waiting).
        Best effort: on a full disk the first write may not fit."""
        if self._fd < 0 or text == self._note:
            return  # unchanged: no write (flash)
        self._note = text
        data = f"{os.getpid()}\n{text[: _NOTE_ROOM - 32]}\n".encode(errors="replace").ljust(_NOTE_ROOM, b" ")
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # the lock goes with the descriptor; the file stays (no unlink race)
            self._fd = -1


def holder(state_dir: Path) -> tuple[int | None, str]:
    """(pid, note) of the agent holding the run lock of `state_dir`, or
    (None, "") when none does. Reads /proc/locks: never takes the lock, so it
    cannot make a starting agent believe another one runs."""
    pid, text = _read_lock(state_dir)
    if pid is None:
        return None, ""
    return pid, text.partition("\n")[2].strip()


def lock_stamp(state_dir: Path) -> tuple[int | None, str]:
    """What changes when the run lock of `state_dir` changes hands: the pid
    holding it (None: no agent) and the lock file's first line, the pid of the
    last agent that took it (`RunLock.acquire` writes it). Two stamps differ
    when an agent took the lock between them, also one that released it again
    since (unless it could not write its pid: a lock file it created on a full
    disk). Takes no lock either."""
    pid, text = _read_lock(state_dir)
    return pid, text.partition("\n")[0]


def _read_lock(state_dir: Path) -> tuple[int | None, str]:
    """(the pid holding the run lock per /proc/locks or None, the lock file's text); (None, "") without one."""
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None, ""
    try:
        st = os.fstat(fd)
        text = os.pread(fd, _NOTE_ROOM, 0).decode(errors="replace")
    finally:
        os.close(fd)
    return _flock_holder(st), text


def _flock_holder(st: os.stat_result) -> int | None:
    """The pid holding a flock on the file `st` per /proc/locks."""
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if parts[0] == "->":
                continue  # a waiter, not the holder
            if parts[1] == "FLOCK" and parts[5] == device:
                return int(parts[4])
    return None
