"""The `wrenn` command line."""
