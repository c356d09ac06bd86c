"""Per-family adapters that feed unpatched transformers models explicit positions."""
