"""The `tokenizer` stage: a byte-level BPE tokenizer with chatpipe's chat format."""
