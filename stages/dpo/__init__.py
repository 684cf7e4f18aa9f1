"""The `dpo` stage: direct preference optimisation of the SFT policy on ranked completions."""
