"""Readers that turn data sources into raw examples (no tokenisation here)."""
