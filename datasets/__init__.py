"""Built-in dataset adapters, each imported here by name."""
