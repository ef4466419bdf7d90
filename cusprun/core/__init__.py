"""Foundations every other room may import: errors, atomic files, progress bars, architectures, neuron names and
geometry, model loading, corpora. Imports nothing else of cusprun.
"""
