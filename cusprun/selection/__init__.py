"""Which neurons go: the paper's Algorithm 1 (rank fractions, aggregation, σ search), whole units (heads, channels,
RoPE pairs) with budgets across layers, and keep plans. Imports only :mod:`cusprun.core`.
"""
