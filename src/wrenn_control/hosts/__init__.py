"""The hosts that run capsules, as the control plane sees them (see directory.py)."""

from wrenn_control.hosts.directory import LOCAL, HostDirectory, HostUnavailable

__all__ = ["LOCAL", "HostDirectory", "HostUnavailable"]
