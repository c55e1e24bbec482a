"""Host side of the QEMU ARM tests: images, disks, guests.

Owns: the image cache (built from Debian packages by build-image.sh, keyed by a
hash of every input, kept outside the checkout), the per-run edgeagent wheel,
the input disk (a tar the guest unpacks at boot) and the results disk (a tar
the guest writes onto a raw block device; read here with `tarfile`, no mount
or loop device), and `Guest`: one QEMU process on a qcow2 overlay of the
cached image, its serial console, its QMP socket, a power cut (SIGKILL).
The guest reaches only the host services it is given, through one
`guestfwd` each on a `restrict=on` user network.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

QEMU_DIR = Path(__file__).resolve().parent
REPO = QEMU_DIR.parent
GUEST_DIR = QEMU_DIR / "guest"
SERVICE_ADDR = "10.0.2.100"  # where the guest finds the host's services (guestfwd)
IMAGE_INPUTS = ["build-image.sh", "mkinitrd.sh", "packages.txt", "wheels.txt", "setup-host", "image"]


@dataclass(frozen=True)
class Arch:
    name: str
    qemu: str
    cpu: str


ARCHES = {
    "arm64": Arch("arm64", "qemu-system-aarch64", "cortex-a57"),
    "armhf": Arch("armhf", "qemu-system-arm", "cortex-a15"),
}


def cache_dir() -> Path:
    """$EDGEAGENT_QEMU_CACHE, else /var/cache/edgeagent-qemu as root, else ~/.cache/edgeagent-qemu."""
    env = os.environ.get("EDGEAGENT_QEMU_CACHE")
    if env:
        return Path(env)
    return Path("/var/cache/edgeagent-qemu") if os.geteuid() == 0 else Path.home() / ".cache/edgeagent-qemu"


def image_key(arch: str, kernel_package: str, root: Path = QEMU_DIR) -> str:
    """sha256 over the architecture, the kernel package version and every file
    that shapes the image (build scripts, package and wheel lists, image/)."""
    digest = hashlib.sha256(f"{arch}\0{kernel_package}\0".encode())
    for name in IMAGE_INPUTS:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0")
            digest.update(f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def kernel_package(arch: str) -> str:
    out = subprocess.run(
        [str(QEMU_DIR / "setup-host"), "--kernel-package", arch], capture_output=True, text=True, check=True
    )
    if "=" not in out.stdout:
        raise RuntimeError(f"no kernel package for {arch} in apt's lists (run qemu/setup-host): {out.stderr}")
    return out.stdout.strip()


def ensure_image(arch: str, log: Callable[[str], None] = print) -> Path:
    """The cached image directory for `arch`, built first if missing (about 5 minutes)."""
    kpkg = kernel_package(arch)
    target = cache_dir() / "images" / f"{arch}-{image_key(arch, kpkg)}"
    if (target / "rootfs.img").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per arch at a time; the second waits and reuses
        if (target / "rootfs.img").exists():
            return target
        log(f"building the {arch} image ({kpkg}) into {target}")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        env = dict(os.environ, PYTHON=sys.executable)  # its pip downloads the wheels.txt wheels
        subprocess.run([str(QEMU_DIR / "build-image.sh"), arch, str(staging)], check=True, env=env)
        staging.rename(target)
    return target


def build_wheel(dest: Path) -> Path:
    """A wheel of this checkout (the code under test), built from a clean copy."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(REPO / "edgeagent", src / "edgeagent", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        # With build isolation: pip fetches setuptools and wheel from the package index.
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps"]
        subprocess.run([*pip_wheel, "-w", str(dest), str(src)], check=True)
    return next(dest.glob("edgeagent-*.whl"))


def run_wheels() -> list[Path]:
    """The run-wheels.txt wheels (pip's download is skipped for those already in the cache)."""
    dest = cache_dir() / "wheels"
    pins = [line.strip() for line in (QEMU_DIR / "run-wheels.txt").read_text().splitlines()]
    pins = [p for p in pins if p and not p.startswith("#")]
    wanted = {p.split("==")[0].replace("-", "_").lower(): p.split("==")[1] for p in pins}
    have = [w for w in dest.glob("*.whl") if wanted.get(w.name.split("-")[0].lower()) == w.name.split("-")[1]]
    if len(have) < len(wanted):
        pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps"]
        subprocess.run([*pip, "--only-binary=:all:", "-d", str(dest), *pins], check=True)
        have = [w for w in dest.glob("*.whl") if wanted.get(w.name.split("-")[0].lower()) == w.name.split("-")[1]]
    return sorted(have)


def write_input_disk(path: Path, files: dict[str, bytes | Path]) -> None:
    """A tar the guest unpacks with `tar -xf /dev/vdb`; padded to whole MiB for the block device."""
    with tarfile.open(path, "w") as tar:
        for name, content in sorted(files.items()):
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate((size // 2**20 + 1) * 2**20)


def read_results(path: Path) -> dict[str, bytes]:
    """What the guest wrote onto the results disk: {name: bytes}; {} if it wrote nothing."""
    with open(path, "rb") as f:
        if not f.read(512).strip(b"\0"):
            return {}
        f.seek(0)
        out = {}
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar.getmembers():
                if member.isfile():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    out[member.name.removeprefix("./")] = extracted.read()
        return out


class GuestError(AssertionError):
    pass


class Guest:
    """One device: an overlay of the cached image that persists across this
    guest's boots (reboots and power cuts keep their disk), a QEMU process per boot."""

    def __init__(self, arch: str, image: Path, workdir: Path, services: dict[int, int]) -> None:
        self.arch = ARCHES[arch]
        self.image = image
        self.workdir = workdir
        self.services = services  # guest port on SERVICE_ADDR -> host port on 127.0.0.1
        self.proc: subprocess.Popen[bytes] | None = None
        self.boots = 0
        self.console_path = workdir / "console.log"
        self._cursor = 0
        workdir.mkdir(parents=True, exist_ok=True)
        self.overlay = workdir / "root.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(image / "rootfs.img"),
                str(self.overlay),
            ],
            check=True,
        )
        self.results_disk = workdir / "results.img"
        self.input_disk = workdir / "input.img"
        self.qmp_path = workdir / "qmp.sock"

    def command(self, scenario: str) -> list[str]:
        # printk.devkmsg=on: the scenarios write many lines to /dev/kmsg, which the default rate-limits.
        kernel_args = f"console=ttyAMA0 root=/dev/vda rw quiet loglevel=4 printk.devkmsg=on edgetest={scenario}"
        fwd = ",".join(
            f"guestfwd=tcp:{SERVICE_ADDR}:{gport}-cmd:{sys.executable} {QEMU_DIR / 'relay.py'} {hport}"
            for gport, hport in self.services.items()
        )
        return [
            self.arch.qemu, "-M", "virt", "-cpu", self.arch.cpu, "-smp", "2", "-m", "1024",
            "-display", "none", "-monitor", "none", "-serial", f"file:{self.workdir / f'console-{self.boots}.log'}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.gz"), "-append", kernel_args,
            "-drive", f"file={self.overlay},format=qcow2,if=none,id=root,cache=writeback",
            "-device", "virtio-blk-pci,drive=root",
            "-drive", f"file={self.input_disk},format=raw,if=none,id=input,readonly=on",
            "-device", "virtio-blk-pci,drive=input",
            "-drive", f"file={self.results_disk},format=raw,if=none,id=results",
            "-device", "virtio-blk-pci,drive=results",
            "-netdev", f"user,id=net0,restrict=on,{fwd}" if fwd else "user,id=net0,restrict=on",
            "-device", "virtio-net-pci,netdev=net0,id=nic0,romfile=",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip

    def boot(self, scenario: str) -> None:
        """Start QEMU (the guest runs `scenario`); the results disk starts empty."""
        assert self.proc is None or self.proc.poll() is not None, "the previous boot is still running"
        self.boots += 1
        with open(self.results_disk, "wb") as f:
            f.truncate(16 * 2**20)
        self.qmp_path.unlink(missing_ok=True)
        self.console_path = self.workdir / f"console-{self.boots}.log"
        self.console_path.write_bytes(b"")
        self._cursor = 0
        self.started = time.time()
        self.proc = subprocess.Popen(
            self.command(scenario), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / f"qemu-{self.boots}.stderr", "wb"),  # noqa: SIM115 - owned by the child
            start_new_session=True,
        )  # fmt: skip

    def console(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def wait_console(self, pattern: str, timeout: float) -> re.Match[str]:
        """The next console match of `pattern` after the previous wait's match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            match = regex.search(text, self._cursor)
            if match:
                self._cursor = match.end()
                return match
            failed = re.search(r"EDGE: FAIL (.*)", text)
            if failed:
                raise GuestError(f"{self.arch.name}: guest failed: {failed.group(1)}")
            if self.proc is not None and self.proc.poll() is not None:
                raise GuestError(f"{self.arch.name}: QEMU exited before /{pattern}/: {self.tail()}")
            if time.monotonic() > deadline:
                raise GuestError(
                    f"{self.arch.name}: no /{pattern}/ on the console within {timeout:.0f}s: {self.tail()}"
                )
            time.sleep(0.1)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.console().splitlines()[-lines:])

    def qmp(self, command: str, **arguments: object) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise GuestError(f"QMP {command}: {reply['error']}")
            return reply

    def set_link(self, up: bool) -> None:
        self.qmp("set_link", name="nic0", up=up)

    def power_cut(self) -> None:
        """SIGKILL QEMU: the guest's page cache is lost, as when a device loses power."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait_exit(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.power_cut()
            raise GuestError(f"{self.arch.name}: the guest did not power off within {timeout:.0f}s: {self.tail()}")

    def results(self) -> dict[str, bytes]:
        return read_results(self.results_disk)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.power_cut()
