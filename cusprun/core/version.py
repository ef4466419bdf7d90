"""cusprun's version (one place: pyproject reads it, experts record it)."""

__version__ = "0.1.0"
