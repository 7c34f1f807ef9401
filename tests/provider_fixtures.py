"""Placeholder until the provider fixtures land."""
