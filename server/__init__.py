"""Flower ServerApp: site discovery, rounds per aggregation group, checkpoints and the final report."""
