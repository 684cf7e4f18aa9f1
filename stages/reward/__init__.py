"""The `reward` stage: a reward model trained on ranked completions (InstructGPT's recipe)."""
