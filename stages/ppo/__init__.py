"""The `ppo` stage: RLHF policy optimisation against the reward model (PPO, RLOO, GRPO)."""
