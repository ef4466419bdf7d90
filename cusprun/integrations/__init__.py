"""cusprun inside other tools: the Torch-Pruning ``Importance``. Imports scores and below.
"""
