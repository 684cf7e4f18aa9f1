from transformers import AutoTokenizer, PreTrainedTokenizerFast

from stages.tokenizer.bpe import adopt_pretrained, train_bpe
from stages.tokenizer.chat_format import PAD_TOKEN, TURN_END, TURN_START
from tests.conftest import decoded_spans

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "And when?"},
    {"role": "assistant", "content": "Around 1600."},
]


def test_any_text_round_trips_exactly(bpe_tokenizer):
    samples = [
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "Unicode: café, naïve, 東京, emoji 🎭 and ∑ symbols",
    ]
    for text in samples:
        ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert bpe_tokenizer.decode(ids) == text


def test_bpe_learns_merges_from_the_corpus(bpe_tokenizer):
    text = "First Citizen: we are accounted poor citizens"
    assert len(bpe_tokenizer(text)["input_ids"]) < len(text.encode()) / 2
    assert len(bpe_tokenizer) == 400


def test_special_tokens_are_single_ids_and_pad_differs_from_eos(bpe_tokenizer):
    assert bpe_tokenizer.eos_token == TURN_END and bpe_tokenizer.pad_token == PAD_TOKEN
    assert bpe_tokenizer.pad_token_id != bpe_tokenizer.eos_token_id
    for token in (PAD_TOKEN, TURN_START, TURN_END):
        assert len(bpe_tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_masks_everything_but_assistant_replies(bpe_tokenizer):
    encoded = bpe_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    spans = decoded_spans(bpe_tokenizer, ids, mask)
    # Each reply, ending in the end-of-turn token the model must learn to emit, and nothing else.
    assert spans == ["Shakespeare.<|im_end|>", "Around 1600.<|im_end|>"]
    masked = bpe_tokenizer.decode([t for t, trained in zip(ids, mask) if not trained])
    assert "Who wrote Hamlet?" in masked and "You are terse." in masked and "<|im_start|>assistant" in masked


def test_generation_prompt_opens_an_assistant_turn(bpe_tokenizer):
    text = bpe_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n")


def test_saved_tokenizer_loads_with_plain_transformers(bpe_tokenizer, tmp_path):
    bpe_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("to be or not to be")["input_ids"] == bpe_tokenizer("to be or not to be")["input_ids"]
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == bpe_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_adopting_a_tokenizer_without_chat_format_adds_pad_and_template(shakespeare_excerpt, tmp_path):
    # A GPT-2-like tokenizer: EOS but no pad token and no chat template.
    plain = train_bpe([[shakespeare_excerpt.read_text()[:20_000]]], vocab_size=320)
    bare = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer, eos_token="<|im_end|>")
    bare.save_pretrained(tmp_path)
    adopted = adopt_pretrained(str(tmp_path))
    assert adopted.pad_token is not None and adopted.pad_token_id != adopted.eos_token_id
    assert "{% generation %}" in adopted.chat_template.replace("{%- generation %}", "{% generation %}")
    encoded = adopted.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(encoded["assistant_masks"]) > 0


def test_a_template_without_generation_markers_is_replaced_and_the_turn_end_becomes_eos(shakespeare_excerpt, tmp_path):
    # Qwen-like: ChatML turn tokens in the vocabulary, a template without {% generation %},
    # and <|endoftext|> as EOS, so replies would end with a token that is not the EOS.
    qwen_like = train_bpe([[shakespeare_excerpt.read_text()[:20_000]]], vocab_size=320)
    qwen_like.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    qwen_like.eos_token = "<|endoftext|>"
    qwen_like.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    qwen_like.save_pretrained(tmp_path)
    size = len(AutoTokenizer.from_pretrained(tmp_path))
    adopted = adopt_pretrained(str(tmp_path))
    assert adopted.eos_token == TURN_END and adopted.pad_token_id not in (adopted.eos_token_id, None)
    assert len(adopted) == size  # the turn tokens were there already; only nothing was added twice
    encoded = adopted.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(encoded["assistant_masks"]) > 0


def test_sft_refuses_a_template_that_masks_everything(bpe_tokenizer):
    import copy

    import pytest

    from data.chat_tokens import tokenize_conversations
    from pipeline.errors import DataError

    plain = copy.deepcopy(bpe_tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(DataError, match="no {% generation %} markers"):
        tokenize_conversations([CONVERSATION], plain, max_length=256, overlong="truncate")
