"""Model aliases, loading from local folders or the hub, and format converters."""
