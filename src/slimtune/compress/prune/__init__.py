"""Pruning: unstructured, structured (heads, FFN, layers) and vocabulary."""
