"""Location-specific prompt pairs: real sites and regions, pair building, the JSONL contract, per-site splits."""

from fed_netgpt.data.schema import DataError, PromptPair, read_jsonl, write_jsonl
from fed_netgpt.data.sites import SiteData, load_heldout_sites, load_pairs, load_sites, site_datasets

__all__ = [
    "DataError", "PromptPair", "SiteData", "load_heldout_sites", "load_pairs", "load_sites", "read_jsonl",
    "site_datasets", "write_jsonl",
]
