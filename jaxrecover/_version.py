"""The package version in one place (part of every resume key; also in pyproject.toml)."""

__version__ = "0.2.0"
