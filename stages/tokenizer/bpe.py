"""Train a byte-level BPE tokenizer, or adopt an existing one, and give it the chat format.

Byte-level BPE (GPT-2's scheme, via the `tokenizers` library) never meets an unknown character:
any text round-trips exactly, which the tests check.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from stages.tokenizer.chat_format import CHAT_TEMPLATE, PAD_TOKEN, SPECIAL_TOKENS, TURN_END, TURN_START


def train_bpe(batches: Iterable[list[str]], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on batches of text, with the chat format set."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(batches, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=TURN_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000_000,
    )


def adopt_pretrained(name: str, revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """An existing tokenizer (hub id or path) made ready for chatpipe: ChatML turns and a distinct pad.

    SFT needs a template with `{% generation %}` markers (to mask everything but the replies) and
    PPO needs the reply's end-of-turn token to be the EOS. A template with generation markers is
    kept as it is; any other (or none) is replaced by chatpipe's ChatML template, whose
    `<|im_end|>` becomes the EOS (Qwen-style tokenizers already have both turn tokens; others get
    them added, and a base model's embeddings are resized to match later).
    """
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    additions = {}
    if not has_generation_markers(tokenizer.chat_template):
        tokenizer.chat_template = CHAT_TEMPLATE
        missing = [token for token in (TURN_START, TURN_END) if token not in tokenizer.get_vocab()]
        if missing:
            additions["additional_special_tokens"] = missing
        additions["eos_token"] = TURN_END
    if tokenizer.pad_token is None or tokenizer.pad_token in (tokenizer.eos_token, additions.get("eos_token")):
        additions["pad_token"] = PAD_TOKEN
    if additions:
        tokenizer.add_special_tokens(additions)
    return tokenizer


def has_generation_markers(template: str | dict | None) -> bool:
    if not isinstance(template, str):
        return False
    return "generation" in template and "endgeneration" in template
