"""The frozen base model and what rides on it: loading (`base`), LoRA adapters as arrays (`adapters`), many
adapters in one pass (`grouped_lora`) and its GPU kernels (`fused`), the precision a step runs in (`precision`),
and the chat template with completion-only labels (`prompting`)."""
