"""Size, latency and throughput measurement, side by side."""
