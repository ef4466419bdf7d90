"""cusprun — Custom Pruning (Cus-Prun): expert models from general LLMs by removing irrelevant neurons."""

__version__ = "0.1.0"
