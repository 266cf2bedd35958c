"""Metrics and evaluation of any output folder."""
