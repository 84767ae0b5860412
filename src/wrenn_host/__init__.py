"""Host agent: drives the VMM, disks and snapshots on one machine."""
