"""Pick the accelerator: KVM when a guest actually boots under it, else TCG.

/dev/kvm existing is not enough: some hosts expose a paravirtual KVM (kvm_pvm) on which a stock
kernel dies with "KVM internal error ... emulation failure". So we try: boot the real guest kernel
into its initramfs with init = `busybox poweroff -f`, and see whether QEMU exits cleanly. The answer
is cached per kernel; WRENN_ACCEL=kvm|tcg overrides.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

PROBE_TIMEOUT_S = 8.0  # a working KVM powers this guest off in well under a second


def choose_accelerator(kernel: Path, initrd: Path, cache_file: Path) -> str:
    override = os.environ.get("WRENN_ACCEL", "").strip().lower()
    if override in ("kvm", "tcg"):
        return override
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = f"{kernel.stat().st_ino}:{kernel.stat().st_mtime_ns}:{_kvm_id()}"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return cached["accel"]
    except (OSError, ValueError):
        pass
    accel = "kvm" if kvm_boots(kernel, initrd) else "tcg"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps({"key": key, "accel": accel, "probed_at": time.time()}))
    return accel


def _kvm_id() -> str:
    st = os.stat("/dev/kvm")
    modules = Path("/proc/modules").read_text() if Path("/proc/modules").exists() else ""
    kvm_mods = sorted(line.split()[0] for line in modules.splitlines() if line.startswith("kvm"))
    return f"{st.st_rdev}:{','.join(kvm_mods)}"


def kvm_boots(kernel: Path, initrd: Path) -> bool:
    """True when the guest kernel reaches its initramfs under KVM and powers off cleanly."""
    with tempfile.TemporaryDirectory() as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            "qemu-system-x86_64", "-M", "microvm,accel=kvm,acpi=on,pit=off,pic=off,rtc=on,isa-serial=on",
            "-cpu", "host", "-m", "256M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 reboot=t panic=-1 rdinit=/bin/busybox -- poweroff -f",
            "-serial", f"file:{serial}",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # On a broken KVM the vCPU stops with an internal error and QEMU just sits there.
            proc.kill()
            proc.communicate()
            return False
        text = out.decode(errors="replace")
        if serial.exists():
            text += serial.read_text(errors="replace")
        return proc.returncode == 0 and "KVM internal error" not in text and "Run /bin/busybox" in text
