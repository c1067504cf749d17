"""fed-netgpt: federated LoRA personalization of edge LLMs (NetGPT's edge half), on Flower."""

import os

# Every model and data set is local: transformers, peft and datasets must never try a hub (they read
# this before their first import, which is why it lives here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
