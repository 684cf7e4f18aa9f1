"""ShareGPT rows and OpenAI content parts read through the loaders the stages use, tokenized like `messages` rows."""

import json

import pytest

from data.chat_tokens import load_conversations, tokenize_conversations
from data.conversations import detect_format
from data.preferences import normalize_preferences
from data.sources import load_source
from pipeline.config import BadRowPolicy, ConversationData, PreferenceData

MESSAGES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"},
     {"role": "assistant", "content": "Shakespeare."}],
    [{"role": "user", "content": "And Macbeth?"}, {"role": "assistant", "content": "Also Shakespeare."},
     {"role": "user", "content": "When?"}, {"role": "assistant", "content": "About 1606."}],
]
SHAREGPT_SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(messages, speakers=SHAREGPT_SPEAKERS):
    return {"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in messages]}


def as_parts(messages):
    return {"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tokens_of(path, tokenizer, cache_dir, **data):
    conversations, report = load_conversations(
        ConversationData(path=str(path), **data), BadRowPolicy(on_bad_row="error"), cache_dir
    )
    dataset, _ = tokenize_conversations(conversations, tokenizer, max_length=512, overlong="truncate")
    return conversations, dataset["input_ids"], dataset["assistant_masks"]


@pytest.mark.parametrize(
    "rows, data",
    [
        ([as_sharegpt(m) for m in MESSAGES], {}),
        ([as_sharegpt(m, {"system": "system", "user": "user", "assistant": "assistant"}) for m in MESSAGES], {}),
        ([as_sharegpt(m) for m in MESSAGES], {"conversation_format": "sharegpt"}),
        ([{"dialog": as_sharegpt(m)["conversations"]} for m in MESSAGES], {"columns": {"conversations": "dialog"}}),
        ([as_parts(m) for m in MESSAGES], {}),
        # rows mixing plain strings and parts in one column load as JSON values
        ([as_parts(MESSAGES[0]), {"messages": MESSAGES[1]}], {}),
    ],
    ids=["sharegpt", "sharegpt-user-assistant", "sharegpt-explicit", "sharegpt-mapped", "content-parts", "mixed-parts"],
)
def test_forms_give_the_token_ids_and_labels_of_messages_rows(rows, data, tmp_path, bpe_tokenizer):
    reference = tokens_of(write_jsonl(tmp_path / "messages.jsonl", [{"messages": m} for m in MESSAGES]), bpe_tokenizer, tmp_path / "c1")
    other = tokens_of(write_jsonl(tmp_path / "other.jsonl", rows), bpe_tokenizer, tmp_path / "c2", **data)
    assert other[0] == MESSAGES
    assert other[1] == reference[1] and other[2] == reference[2]
    assert any(other[2][0])


def test_text_parts_are_joined_with_a_newline(tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "a poem"}]},
                        {"role": "assistant", "content": "Nice."}]}
    conversations, _ = load_conversations(ConversationData(path=str(write_jsonl(tmp_path / "d.jsonl", [row]))), BadRowPolicy(), tmp_path / "c")
    assert conversations[0][0] == {"role": "user", "content": "Look:\na poem"}


def test_sharegpt_is_detected_from_the_conversations_column():
    assert detect_format(["conversations", "id"]) == "sharegpt"
    assert detect_format(["messages", "conversations"]) == "messages"


def test_image_rows_are_dropped_and_counted_by_part_type(tmp_path):
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                       {"type": "image_url", "image_url": {"url": "cat.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    rows = [{"messages": MESSAGES[0]}] * 9 + [image]
    conversations, report = load_conversations(
        ConversationData(path=str(write_jsonl(tmp_path / "d.jsonl", rows))), BadRowPolicy(max_bad_fraction=0.2), tmp_path / "c"
    )
    assert len(conversations) == 9 and report.dropped == 1
    assert report.examples == ["row 10: user message has a 'image_url' content part; only text parts are read (remove the row or turn the part into text)"]


def test_preferences_in_sharegpt_and_parts_equal_messages_preferences(tmp_path):
    prompt, chosen, rejected = MESSAGES[0][:2], MESSAGES[0][2], {"role": "assistant", "content": "Marlowe."}
    plain = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    forms = [
        {"prompt": as_sharegpt(prompt)["conversations"], "chosen": as_sharegpt([chosen])["conversations"],
         "rejected": as_sharegpt([rejected])["conversations"]},
        {"prompt": as_parts(prompt)["messages"], "chosen": as_parts([chosen])["messages"], "rejected": as_parts([rejected])["messages"]},
        {"chosen": as_sharegpt(prompt + [chosen])["conversations"], "rejected": as_sharegpt(prompt + [rejected])["conversations"]},
    ]
    def groups(rows, name):
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        found, _ = normalize_preferences(load_source(PreferenceData(path=str(path)), cache_dir=tmp_path / name), on_bad_row="error")
        return [(g.prompt, g.completions, g.pairs) for g in found]
    expected = groups([plain], "plain")
    assert expected[0][1] == [prompt + [chosen], prompt + [rejected]]
    for number, row in enumerate(forms):
        assert groups([row], f"form{number}") == expected
