"""The package version (also in pyproject.toml), importable without the package face."""

__version__ = "0.1.0"
