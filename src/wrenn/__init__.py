"""Wrenn Python SDK."""
