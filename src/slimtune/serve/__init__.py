"""HTTP serving with dynamic batching."""
