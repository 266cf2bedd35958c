"""Recipe settings: typed dataclasses, YAML loading, overrides and validation."""
