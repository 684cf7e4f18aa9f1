"""Conversation formats -> messages: each format, the HH parser on real rows, bad rows, policies."""

import json
from pathlib import Path

import pytest

from data.conversations import (
    FORMATS,
    FormatError,
    RowError,
    detect_format,
    normalize_rows,
    parse_hh,
    prompt_of,
    to_messages,
)
from pipeline.errors import DataError

HH_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "samples" / "hh_harmless_1000.jsonl"


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


def good_row(number):
    return {"prompt": f"question {number}", "response": f"answer {number}"}


def bad_row():
    return {"prompt": "question", "response": "   "}


# --- each format -----------------------------------------------------------------------------


def test_messages_format_resolves_role_aliases_and_keeps_only_role_and_content():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "human", "content": "Hi", "name": "ann"},
            {"role": "gpt", "content": "Hello."},
            {"role": "user", "content": "And?"},
            {"role": "model", "content": "Bye."},
        ]
    }
    assert to_messages(row, "messages") == [
        system("Be brief."),
        user("Hi"),
        assistant("Hello."),
        user("And?"),
        assistant("Bye."),
    ]


def test_trailing_turns_after_the_last_assistant_reply_are_removed():
    row = {"messages": [user("Hi"), assistant("Hello."), user("Anything else?")]}
    assert to_messages(row, "messages") == [user("Hi"), assistant("Hello.")]


def test_prompt_response_with_string_prompt_and_system_column():
    row = {"prompt": "What is 2+2?", "response": "4", "system": "You are a calculator."}
    expected = [system("You are a calculator."), user("What is 2+2?"), assistant("4")]
    assert to_messages(row, "prompt_response") == expected


def test_prompt_response_accepts_completion_and_message_lists():
    row = {
        "prompt": [user("Hi"), assistant("Hello."), user("Name a colour.")],
        "completion": [assistant("Blue.")],
    }
    expected = [user("Hi"), assistant("Hello."), user("Name a colour."), assistant("Blue.")]
    assert to_messages(row, "prompt_response") == expected


def test_prompt_response_through_a_column_mapping():
    row = {"question": "Capital of France?", "answer": "Paris."}
    columns = {"prompt": "question", "response": "answer"}
    assert to_messages(row, "prompt_response", columns) == [user("Capital of France?"), assistant("Paris.")]


def test_instruction_joins_a_non_empty_input_with_a_blank_line():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert to_messages(row, "instruction") == [user("Translate to French.\n\nGood morning"), assistant("Bonjour")]


def test_instruction_without_input():
    row = {"instruction": "Name a prime.", "input": "", "output": "7"}
    assert to_messages(row, "instruction") == [user("Name a prime."), assistant("7")]


def test_hh_reads_chosen_by_default_and_text_otherwise():
    text = "\n\nHuman:  Hi there \n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye. "
    expected = [user("Hi there"), assistant("Hello!"), user("Bye"), assistant("Goodbye.")]
    assert to_messages({"chosen": text, "rejected": "ignored"}, "hh") == expected
    assert to_messages({"text": text}, "hh") == expected
    assert to_messages({"dialogue": text}, "hh", {"text": "dialogue"}) == expected


# --- the HH parser -----------------------------------------------------------------------------


def hh_sample_rows(count):
    with HH_SAMPLE.open(encoding="utf-8") as lines:
        return [json.loads(next(lines)) for _ in range(count)]


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_parse_hh_on_real_rows(side):
    rows = hh_sample_rows(3)
    conversations = [parse_hh(row[side]) for row in rows]

    assert [len(messages) for messages in conversations] == [6, 6, 4]
    for messages in conversations:
        roles = [message["role"] for message in messages]
        assert roles == ["user", "assistant"] * (len(messages) // 2)
        assert all(message["content"] == message["content"].strip() for message in messages)
    assert conversations[0][0] == user("what are some pranks with a pen i can do?")
    assert conversations[0][1] == assistant("Are you looking for practical joke ideas?")


def test_chosen_and_rejected_share_the_prompt_and_differ_in_the_reply():
    row = hh_sample_rows(1)[0]
    chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
    assert prompt_of(chosen) == prompt_of(rejected)
    assert chosen[-1] != rejected[-1]


def test_parse_hh_joins_repeated_turns_of_one_speaker():
    text = "\n\nHuman: Hi\n\nAssistant: One.\n\nAssistant: Two."
    assert parse_hh(text) == [user("Hi"), assistant("One.\n\nTwo.")]


def test_parse_hh_keeps_a_speaker_name_inside_a_turn_as_content():
    text = "\n\nHuman: Quote this: Human: hello\n\nAssistant: Human: hello"
    assert parse_hh(text) == [user("Quote this: Human: hello"), assistant("Human: hello")]


def test_parse_hh_needs_a_human_turn_first():
    with pytest.raises(RowError, match="does not start with a 'Human:' turn"):
        parse_hh("\n\nAssistant: Hello")
    with pytest.raises(RowError, match="does not start with a 'Human:' turn"):
        parse_hh("just some text")


# --- bad rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fmt", "reason"),
    [
        ({"prompt": "Hi"}, "prompt_response", "missing field 'response'"),
        ({"instruction": "Do it.", "output": None}, "instruction", "missing field 'output'"),
        ({"prompt": "Hi", "response": "  \n"}, "prompt_response", "empty assistant reply"),
        ({"messages": [user("Hi"), {"role": "bot", "content": "Hey"}]}, "messages", "unknown role 'bot'"),
        ({"messages": [user("Hi")]}, "messages", "no assistant turn"),
        ({"messages": [user("Hi"), assistant(42)]}, "messages", "assistant message content is int, not a string"),
        ({"instruction": ["Do it."], "output": "Done."}, "instruction", "field 'instruction' is list, not a string"),
        ({"messages": [user("Hi"), assistant("Hey"), system("Late")]}, "messages", "system message after the first"),
        ({"messages": "Hi"}, "messages", "messages is str, not a list"),
        ({"prompt": "Hi", "response": [user("Hey")]}, "prompt_response", "one assistant message"),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant:"}, "hh", "empty assistant reply"),
    ],
)
def test_bad_rows_say_what_is_wrong(row, fmt, reason):
    with pytest.raises(RowError) as caught:
        to_messages(row, fmt)
    assert reason in str(caught.value)


def test_unknown_format_and_unknown_column_field_are_format_errors():
    with pytest.raises(FormatError, match="unknown conversation format 'alpaca'"):
        to_messages({"instruction": "x", "output": "y"}, "alpaca")
    with pytest.raises(FormatError, match="unknown field\\(s\\) 'answer'"):
        to_messages({"answer": "y"}, "prompt_response", {"answer": "response"})


# --- whole datasets ------------------------------------------------------------------------------


def test_drop_policy_counts_reasons_and_keeps_good_rows():
    rows = [good_row(n) for n in range(18)] + [bad_row(), {"prompt": "question"}]
    conversations, report = normalize_rows(rows, max_bad_fraction=0.1)

    assert len(conversations) == 18
    assert conversations[0] == [user("question 0"), assistant("answer 0")]
    assert (report.total, report.kept, report.dropped) == (20, 18, 2)
    assert report.reasons == {"empty assistant reply": 1, "missing field 'response'": 1}
    assert report.examples == ["row 19: empty assistant reply", "row 20: missing field 'response'"]
    assert report.summary() == (
        "kept 18 of 20 rows; dropped 2 (10.0%): empty assistant reply (1), missing field 'response' (1)"
    )


def test_error_policy_names_source_row_and_fix():
    rows = [good_row(1), good_row(2), bad_row()]
    with pytest.raises(DataError) as caught:
        normalize_rows(rows, on_bad_row="error", source="data/sft.jsonl")
    message = str(caught.value)
    assert "data/sft.jsonl" in message
    assert "row 3" in message
    assert "empty assistant reply" in message
    assert "sft.on_bad_row: drop" in message


def test_too_many_dropped_rows_stop_the_run():
    rows = [good_row(n) for n in range(8)] + [bad_row(), bad_row()]
    with pytest.raises(DataError) as caught:
        normalize_rows(rows, max_bad_fraction=0.1, source="data/sft.jsonl")
    message = str(caught.value)
    assert "data/sft.jsonl" in message
    assert "2 of 10 rows (20.0%)" in message
    assert "empty assistant reply (2)" in message
    assert "row 9: empty assistant reply" in message
    assert "raise sft.max_bad_fraction" in message

    conversations, report = normalize_rows(rows, max_bad_fraction=0.2)
    assert (len(conversations), report.dropped) == (8, 2)


def test_no_usable_row_is_an_error_even_with_a_permissive_limit():
    with pytest.raises(DataError, match="none of the 2 rows"):
        normalize_rows([bad_row(), bad_row()], max_bad_fraction=1.0, source="data/sft.jsonl")
    with pytest.raises(DataError, match="no rows"):
        normalize_rows([], source="data/sft.jsonl")


def test_auto_format_on_real_hh_rows():
    conversations, report = normalize_rows(hh_sample_rows(3), source=str(HH_SAMPLE))
    assert report.summary() == "kept 3 of 3 rows"
    assert [len(messages) for messages in conversations] == [6, 6, 4]


def test_auto_format_with_unknown_columns_names_the_source():
    expected = "data/odd.jsonl: no conversation format fits the columns \\[question, answer\\]"
    with pytest.raises(FormatError, match=expected):
        normalize_rows([{"question": "q", "answer": "a"}], source="data/odd.jsonl")


# --- prompts and formats ----------------------------------------------------------------------------


def test_prompt_of_is_everything_before_the_final_reply():
    messages = [system("Be kind."), user("Hi"), assistant("Hello."), user("Joke?"), assistant("No.")]
    assert prompt_of(messages) == [system("Be kind."), user("Hi"), assistant("Hello."), user("Joke?")]
    with pytest.raises(RowError, match="no assistant turn"):
        prompt_of([user("Hi")])


@pytest.mark.parametrize(
    ("column_names", "columns", "fmt"),
    [
        (["messages", "id"], None, "messages"),
        (["prompt", "response"], None, "prompt_response"),
        (["prompt", "completion"], None, "prompt_response"),
        (["question", "answer"], {"prompt": "question", "response": "answer"}, "prompt_response"),
        (["instruction", "input", "output"], None, "instruction"),
        (["chosen", "rejected"], None, "hh"),
        (["text"], None, "hh"),
        (["dialogue"], {"text": "dialogue"}, "hh"),
    ],
)
def test_detect_format(column_names, columns, fmt):
    assert detect_format(column_names, columns) == fmt
    assert fmt in FORMATS


def test_detect_format_lists_columns_and_formats_when_none_fits():
    with pytest.raises(ValueError) as caught:
        detect_format(["question", "answer"])
    assert isinstance(caught.value, DataError)
    message = str(caught.value)
    assert "[question, answer]" in message
    for fmt in FORMATS:
        assert fmt in message
