"""Hosts: which host agent holds a capsule (directory), the fleet's registered hosts (registry),
where a new capsule goes (placement) and one HostAgent over them all (router)."""
