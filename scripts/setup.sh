#!/usr/bin/env bash
# Installs everything the platform and its tests need on Debian 12 (as root), then builds the
# guest images into the cache (a no-op when they are up to date). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# postgresql: the control plane's unit tests also run on a throwaway PostgreSQL server
# (the packaged cluster is not used; it need not be running).
APT_PACKAGES=(qemu-system-x86 qemu-utils debootstrap e2fsprogs lz4 cpio busybox-static file
              iproute2 nftables procps tmux postgresql)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The kernel is fetched with `apt-get download`, which needs current package lists.
if ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q "Candidate: [0-9]"; then
  apt-get update -qq
fi

PYTHON=${PYTHON:-python3}
if ! $PYTHON -c "import wrenn_cli, pytest_asyncio" 2>/dev/null || [ pyproject.toml -nt .setup-stamp ]; then
  echo "setup: installing the Python package and test dependencies"
  $PYTHON -m pip install -q --disable-pip-version-check -e '.[test]'
  touch .setup-stamp
fi

# Kernel + root filesystems (debootstrap: a few minutes the first time, cached afterwards).
wrenn images build
