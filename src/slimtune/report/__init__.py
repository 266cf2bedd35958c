"""The HTML trade-off report."""
