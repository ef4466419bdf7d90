"""Plans made into models: dense (per-layer shapes), sliced, masked and stock formats, the shipped modeling code, and
model folders written atomically. Imports :mod:`cusprun.selection` and :mod:`cusprun.core`.
"""
