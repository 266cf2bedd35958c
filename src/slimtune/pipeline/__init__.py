"""The `run` chain and the `compress` accuracy-constrained search."""
