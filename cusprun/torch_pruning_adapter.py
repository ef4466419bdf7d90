"""The adapter's public import path, kept stable: ``from cusprun.torch_pruning_adapter import CusprunImportance``.
The code lives in :mod:`cusprun.integrations.torch_pruning`."""

from .integrations.torch_pruning import CusprunImportance

__all__ = ["CusprunImportance"]
