"""What every stage does with a causal LM besides training it: forward passes over responses, and generation."""
