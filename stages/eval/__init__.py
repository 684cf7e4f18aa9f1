"""The `eval` stage: the SFT and RLHF policies side by side on held-out prompts."""
