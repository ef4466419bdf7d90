"""Perplexity and speed, pictures, and the main job (score, build, evaluate, tabulate). Imports experts and below.
"""
