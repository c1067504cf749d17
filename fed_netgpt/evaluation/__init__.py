"""Measuring what the federation learned: completions scored per variant (`scoring`), the fact metrics
(`metrics`), the report and its plots (`report`, `plots`), variants side by side (`comparison`), and membership
inference against the adapters (`leakage`)."""
