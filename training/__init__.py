"""Training: pinned reference, KTO / DPO / IPO on LoRA, cached reference log-probs."""
