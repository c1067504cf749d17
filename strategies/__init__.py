"""Aggregation: pure functions on arrays (aggregation.py), then Flower strategies that use them."""
