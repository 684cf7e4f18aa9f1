"""The `sft` stage: supervised fine-tuning on conversations, loss on the assistant's tokens only."""
