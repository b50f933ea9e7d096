"""Logical-axis sharding: models name logical axes, rule tables map them to mesh axes."""
