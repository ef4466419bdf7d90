"""The scoring engine: layer-major passes over packed documents, one layer's scores, layer sources (in memory or
streamed), checkpoints, hidden-state store, ``torchrun`` ranks; scoring corpora into files and the Python API.
Imports scores and below, and :mod:`cusprun_kernels`.
"""
