"""`wrenn images build` against the real image cache (built by scripts/setup.sh)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.vm


def test_second_images_build_is_a_noop():
    subprocess.run([sys.executable, "-m", "wrenn_cli.main", "images", "build"], check=True, capture_output=True)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "wrenn_cli.main", "images", "build"],
                         check=True, capture_output=True, text=True)
    assert "nothing to do" in out.stdout + out.stderr
    assert time.monotonic() - started < 30  # no debootstrap, no download
