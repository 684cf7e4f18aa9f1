"""The `pretrain` stage: causal-LM pretraining from scratch, or adopting a base model."""
