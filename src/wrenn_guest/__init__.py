"""Guest agent: runs inside every capsule on the guest's own python3 (standard library only)."""

__version__ = "0.1.0"
