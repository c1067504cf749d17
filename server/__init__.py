"""Flower ServerApp: region discovery, regional rounds, checkpoints and the final report."""
