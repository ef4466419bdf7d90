"""Score files made into expert models: selection, closed-form compensation, the model folder and ``pruning.json``.
Imports engine (calibration passes, streamed layers) and below.
"""
