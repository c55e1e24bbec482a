"""A real small file system for degraded-storage tests: a tmpfs mounted by the
test (root only) and a filler that takes it to ENOSPC."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file until the file system is full (ENOSPC). Returns its path."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # All the free space in one allocation first: a spool sizes its cap by the free space (docs/spool.md,
        # "Space"), and a disk seen half full for the tens of milliseconds a write loop takes is less room,
        # which it meets by evicting, as designed — not the full disk these tests are about.
        st = os.statvfs(directory)
        try:
            os.posix_fallocate(fd, os.fstat(fd).st_size, st.f_bavail * st.f_frsize)
        except OSError:
            pass  # the rest is written below
        for size in (1 << 20, 65536, 4096, 512, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def remount(mount: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(mount)], check=True)
