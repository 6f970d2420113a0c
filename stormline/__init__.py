"""Stormline: the CLI and the one settings object shared by every part."""

__version__ = "0.1.0"
