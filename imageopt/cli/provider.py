def register(commands):
    """Placeholder until serve-provider lands."""
