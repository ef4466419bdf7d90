"""Scores at rest: ``ScoreSet``, the ``cusprun-scores/1`` and ``cusprun-stats/1`` file formats, the method registry
and the baseline scorers. Imports formats, selection and core.
"""
