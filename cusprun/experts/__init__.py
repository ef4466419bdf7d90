"""Score files made into expert models: selection, closed-form compensation, the model folder and ``pruning.json``.
Imports scores, formats, selection and core.
"""
