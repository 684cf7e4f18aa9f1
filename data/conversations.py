"""Turn the conversation formats datasets come in into chat `messages` lists.

    conversations, report = normalize_rows(load_source(source), source=source.path)
    conversations[0]  # [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]

Five formats are read (`FORMATS`), each named after the columns that carry it:

- `messages`: a list of `{"role", "content"}` dicts (the OpenAI / TRL conversational form). A
  content may also be OpenAI content parts, `[{"type": "text", "text": ...}, ...]`: the text parts
  are joined with a newline (as vLLM does); a part of another type (image_url, input_audio, ...)
  makes the row unusable, since these models read text only.
- `sharegpt`: a `conversations` list of `{"from", "value"}` dicts, `from` being human, gpt or
  system (or user / assistant). Such turns are also accepted wherever a messages list is.
- `prompt_response`: a prompt (a string, or a messages list for multi-turn context) and a response
  (a string, or one assistant message); `completion` is accepted for `response`.
- `instruction` (Alpaca): `instruction`, optional `input`, `output`.
- `hh` (Anthropic HH-RLHF): one string `"\\n\\nHuman: ...\\n\\nAssistant: ..."` in `chosen` or `text`.

`columns` maps our field names (`FIELDS`) to a dataset's own column names, e.g.
`{"prompt": "question", "response": "answer"}`. Every conversation then passes the same checks
(`validate_messages`), so the SFT, reward and PPO stages all see the same shape: known roles,
string contents, a system message only first, at least one assistant turn, no empty assistant
reply, and nothing after the last assistant turn (a trailing user turn carries no loss).

A row that fails is a `RowError` saying what is wrong with it; `normalize_rows` applies the
bad-row policy of `data.rows` (shared with preference data): stop at the first bad row (a
`DataError` naming the file and row), or drop and count them (`RowReport`) and stop when too many
rows are unusable, since that usually means the wrong format or mapping.
"""

from __future__ import annotations

import re
from typing import Iterable

from data.rows import BadRows, RowError, RowReport
from pipeline.config import CONVERSATION_FIELDS
from pipeline.errors import DataError

FORMATS = ("messages", "sharegpt", "prompt_response", "instruction", "hh")
FIELDS = CONVERSATION_FIELDS
ROLES = ("system", "user", "assistant")
# Only the aliases of formats people actually use (ShareGPT's human/gpt, Gemini's model); a role
# outside these is more likely a mapping mistake than something to guess at.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant"}
RESPONSE_ALIASES = ("response", "completion")
HH_COLUMNS = ("chosen", "text")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
# ShareGPT's keys for role and content.
SHAREGPT_KEYS = {"role": "from", "content": "value"}


class FormatError(DataError, ValueError):
    """A dataset whose columns fit no format, or a `columns` mapping or format name that is unknown.

    A `DataError` (the command line prints it without a traceback) and a `ValueError`.
    """


# ---------------------------------------------------------------------------------------------
# Columns and formats
# ---------------------------------------------------------------------------------------------


def check_columns(columns: dict[str, str] | None) -> None:
    """FormatError unless every key of `columns` is one of our field names (`FIELDS`)."""
    unknown = sorted(set(columns or {}) - set(FIELDS))
    if unknown:
        raise FormatError(
            f"unknown field(s) {', '.join(map(repr, unknown))} in columns; the fields are {', '.join(FIELDS)}. "
            f"`columns` maps our field name to your column name, e.g. {{prompt: question, response: answer}}"
        )


def column_for(field_name: str, columns: dict[str, str] | None) -> str:
    """The dataset column that holds one of our fields: `column_for("prompt", {"prompt": "question"}) == "question"`."""
    return (columns or {}).get(field_name, field_name)


def present_column(names: Iterable[str], columns: dict[str, str] | None, field_name: str, defaults: tuple[str, ...]) -> str | None:
    """The column holding `field_name`: the mapped one (never second-guessed), else the first of `defaults`; None if absent."""
    names = set(names)
    if columns and field_name in columns:
        return columns[field_name] if columns[field_name] in names else None
    return next((name for name in defaults if name in names), None)


def response_column(names: Iterable[str], columns: dict[str, str] | None) -> str | None:
    """The column holding the response: the mapped one, else `response`, else `completion`; None if absent."""
    return present_column(names, columns, "response", RESPONSE_ALIASES)


def hh_column(names: Iterable[str], columns: dict[str, str] | None) -> str | None:
    """The column holding HH text: the one mapped to `text`, else `chosen`, else `text`; None if absent."""
    return present_column(names, columns, "text", HH_COLUMNS)


def detect_format(column_names: list[str], columns: dict[str, str] | None = None) -> str:
    """The format (one of `FORMATS`) that a dataset's columns carry, after applying `columns`.

    Checked in order: `messages`; `conversations`; `prompt` + `response`/`completion`; `instruction` + `output`;
    `chosen` or `text` (HH text: its content is checked row by row, as the names cannot tell).

    >>> detect_format(["prompt", "completion"])
    'prompt_response'
    >>> detect_format(["question", "answer"], {"prompt": "question", "response": "answer"})
    'prompt_response'
    """
    check_columns(columns)
    names = set(column_names)

    def present(field_name: str) -> bool:
        return column_for(field_name, columns) in names

    if present("messages"):
        return "messages"
    if present("conversations"):
        return "sharegpt"
    if present("prompt") and response_column(names, columns) is not None:
        return "prompt_response"
    if present("instruction") and present("output"):
        return "instruction"
    if hh_column(names, columns) is not None:
        return "hh"
    raise FormatError(
        f"no conversation format fits the columns [{', '.join(column_names)}]; accepted formats: "
        f"messages (a 'messages' column of role/content lists), "
        f"sharegpt (a 'conversations' column of from/value lists), "
        f"prompt_response ('prompt' + 'response' or 'completion'), "
        f"instruction ('instruction' + 'output', optional 'input'), "
        f"hh ('chosen' or 'text' holding '\\n\\nHuman: ...\\n\\nAssistant: ...' text). "
        f"Map your column names onto these with `columns`, e.g. {{prompt: question, response: answer}}"
    )


# ---------------------------------------------------------------------------------------------
# Checking a conversation
# ---------------------------------------------------------------------------------------------


def normalize_message(message: object) -> dict:
    """One message as `{"role", "content"}` with the role alias resolved; RowError if malformed.

    ShareGPT turns (`{"from", "value"}`) and OpenAI content parts are read too (`content_text`).

    >>> normalize_message({"role": "human", "content": "Hi", "name": "x"})
    {'role': 'user', 'content': 'Hi'}
    >>> normalize_message({"from": "gpt", "value": "Hello"})
    {'role': 'assistant', 'content': 'Hello'}
    """
    if not isinstance(message, dict):
        raise RowError(f"a message is {type(message).__name__}, not a dict with 'role' and 'content'")
    sharegpt = message.get("role") is None and message.get("from") is not None
    keys = SHAREGPT_KEYS if sharegpt else {"role": "role", "content": "content"}
    for key in keys.values():
        if message.get(key) is None:
            present = ", ".join(str(name) for name, value in message.items() if value is not None)
            raise RowError(f"a message has no {key!r} (keys: {present})")
    role = ROLE_ALIASES.get(message[keys["role"]], message[keys["role"]])
    if role not in ROLES:
        raise RowError(f"unknown role {message[keys['role']]!r} (use {', '.join(ROLES)})")
    return {"role": role, "content": content_text(message[keys["content"]], role)}


def content_text(content: object, role: str) -> str:
    """A message content as a string: the string itself, or OpenAI text parts joined with a newline.

    Keys that are None are ignored (a dataset whose rows mix part types fills them in).

    >>> content_text([{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}], "user")
    'Hi\\nthere'
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RowError(f"{role} message content is {type(content).__name__}, not a string or a list of text parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RowError(f"{role} message has a content part that is not a dict with a 'type'")
        if part["type"] != "text":
            raise RowError(
                f"{role} message has a {part['type']!r} content part; only text parts are read "
                f"(remove the row or turn the part into text)"
            )
        if not isinstance(part.get("text"), str):
            raise RowError(f"{role} message has a text part whose 'text' is {type(part.get('text')).__name__}, not a string")
        texts.append(part["text"])
    return "\n".join(texts)


def validate_messages(messages: object) -> list[dict]:
    """A conversation that passes every check, as new `{"role", "content"}` dicts.

    Turns after the last assistant turn are removed (they carry no loss); everything else that is
    wrong is a RowError: an unknown role, non-string content, a system message that is not first,
    no assistant turn, an empty assistant reply.

    >>> validate_messages([{"role": "user", "content": "Hi"}, {"role": "gpt", "content": "Hello"},
    ...                    {"role": "user", "content": "Bye"}])
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    """
    if not isinstance(messages, list):
        raise RowError(f"messages is {type(messages).__name__}, not a list of role/content dicts")
    messages = [normalize_message(message) for message in messages]
    if any(message["role"] == "system" for message in messages[1:]):
        raise RowError("system message after the first turn (only the first message may be system)")
    assistant_positions = [position for position, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistant_positions:
        raise RowError("no assistant turn")
    messages = messages[: assistant_positions[-1] + 1]
    if any(not message["content"].strip() for message in messages if message["role"] == "assistant"):
        raise RowError("empty assistant reply")
    return messages


def prompt_of(messages: list[dict]) -> list[dict]:
    """The messages before the final assistant turn: what a policy is asked to continue in PPO.

    >>> prompt_of([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    [{'role': 'user', 'content': 'Hi'}]
    """
    last = max((position for position, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None:
        raise RowError("no assistant turn")
    return list(messages[:last])


# ---------------------------------------------------------------------------------------------
# Reading each format
# ---------------------------------------------------------------------------------------------


def parse_hh(text: str) -> list[dict]:
    """Anthropic HH-RLHF text -> alternating user/assistant messages, contents stripped.

    Turns start at "\\n\\nHuman:" or "\\n\\nAssistant:" ("Human:" inside a turn is content). Two
    turns of the same role in a row (a few HH rows have them) are joined with a blank line, so roles
    always alternate. The text must start with a Human turn; no other check is made here.

    >>> parse_hh("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    if not isinstance(text, str):
        raise RowError(f"HH text is {type(text).__name__}, not a string")
    text = text.lstrip()
    if not text.startswith("Human:"):
        raise RowError("HH text does not start with a 'Human:' turn")
    pieces = HH_TURN.split("\n\n" + text)  # ["", "Human", content, "Assistant", content, ...]
    messages: list[dict] = []
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        role, content = HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(part for part in (messages[-1]["content"], content) if part)
        else:
            messages.append({"role": role, "content": content})
    return messages


def field_value(row: dict, column: str) -> object:
    """`row[column]`, or RowError "missing field ..." when absent or None."""
    value = row.get(column)
    if value is None:
        raise RowError(f"missing field {column!r}")
    return value


def string_field(row: dict, column: str) -> str:
    """`row[column]` as a string, or RowError when absent or not a string."""
    value = field_value(row, column)
    if not isinstance(value, str):
        raise RowError(f"field {column!r} is {type(value).__name__}, not a string")
    return value


def system_messages(row: dict, columns: dict[str, str] | None) -> list[dict]:
    """The optional system message from the `system` column: [] when absent or empty."""
    column = column_for("system", columns)
    if row.get(column) in (None, ""):
        return []
    return [{"role": "system", "content": string_field(row, column)}]


def read_messages_row(row: dict, columns: dict[str, str] | None) -> list:
    """A `messages` row: the list itself (checked by `validate_messages`)."""
    return field_value(row, column_for("messages", columns))


def read_sharegpt_row(row: dict, columns: dict[str, str] | None) -> list:
    """A ShareGPT row: the `conversations` list of from/value turns (read by `normalize_message`)."""
    return field_value(row, column_for("conversations", columns))


def read_prompt_response_row(row: dict, columns: dict[str, str] | None) -> list[dict]:
    """A prompt (string or messages) and a response (string or one assistant message)."""
    prompt_column = column_for("prompt", columns)
    prompt = field_value(row, prompt_column)
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        prompt_messages = [normalize_message(message) for message in prompt]
    else:
        raise RowError(f"field {prompt_column!r} is {type(prompt).__name__}, not a string or a messages list")

    column = response_column(row, columns) or column_for("response", columns)
    response = field_value(row, column)
    if isinstance(response, list):
        reply = [normalize_message(message) for message in response]
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise RowError(f"field {column!r} holds {len(reply)} message(s); give a string or one assistant message")
    elif isinstance(response, str):
        reply = [{"role": "assistant", "content": response}]
    else:
        raise RowError(f"field {column!r} is {type(response).__name__}, not a string or one assistant message")
    return system_messages(row, columns) + prompt_messages + reply


def read_instruction_row(row: dict, columns: dict[str, str] | None) -> list[dict]:
    """An Alpaca row: user = instruction (+ "\\n\\n" + input when non-empty), assistant = output."""
    request = string_field(row, column_for("instruction", columns))
    input_column = column_for("input", columns)
    if row.get(input_column) not in (None, ""):
        request += "\n\n" + string_field(row, input_column)
    output = string_field(row, column_for("output", columns))
    turns = [{"role": "user", "content": request}, {"role": "assistant", "content": output}]
    return system_messages(row, columns) + turns


def read_hh_row(row: dict, columns: dict[str, str] | None) -> list[dict]:
    """An HH row: the text in the `text`-mapped column, else `chosen`, else `text`."""
    column = hh_column(row, columns)
    if column is None:
        expected = columns["text"] if columns and "text" in columns else HH_COLUMNS[0]
        raise RowError(f"missing field {expected!r}")
    text = field_value(row, column)
    if isinstance(text, list):
        raise RowError(
            f"field {column!r} holds a messages list, not HH text (read it as format 'messages', "
            f"with columns {{messages: {column}}})"
        )
    return parse_hh(text)


FORMAT_READERS = {
    "messages": read_messages_row,
    "sharegpt": read_sharegpt_row,
    "prompt_response": read_prompt_response_row,
    "instruction": read_instruction_row,
    "hh": read_hh_row,
}


def to_messages(row: dict, fmt: str, columns: dict[str, str] | None = None) -> list[dict]:
    """One dataset row in format `fmt` -> checked messages; RowError if the row is unusable.

    >>> to_messages({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "instruction")
    [{'role': 'user', 'content': 'Add 2 and 3.'}, {'role': 'assistant', 'content': '5'}]
    """
    if fmt not in FORMAT_READERS:
        raise FormatError(f"unknown conversation format {fmt!r}; use one of {', '.join(FORMATS)} (or auto)")
    check_columns(columns)
    return validate_messages(FORMAT_READERS[fmt](row, columns))


# ---------------------------------------------------------------------------------------------
# A whole dataset
# ---------------------------------------------------------------------------------------------


def normalize_rows(
    rows: Iterable[dict],
    *,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    on_bad_row: str = "drop",
    max_bad_fraction: float = 0.1,
    source: str = "<data>",
    config_section: str = "sft",
) -> tuple[list[list[dict]], RowReport]:
    """Every row as checked messages, with a report of what was dropped.

    fmt="auto" detects the format from the first row's keys. on_bad_row="error" raises a DataError
    at the first unusable row; "drop" skips such rows, but raises a DataError when more than
    `max_bad_fraction` of them were dropped, or none is left. Messages name `source`, the row
    (counting from 1) and the `config_section` setting that changes the behaviour.
    """
    try:
        check_columns(columns)
    except FormatError as error:
        raise FormatError(f"{source}: {error}") from None

    def read_conversation(row: dict) -> list[dict]:
        nonlocal fmt
        try:
            if fmt == "auto":
                fmt = detect_format(list(row), columns)
            return to_messages(row, fmt, columns)
        except FormatError as error:
            raise FormatError(f"{source}: {error}") from None

    bad_rows = BadRows(
        on_bad_row=on_bad_row, max_bad_fraction=max_bad_fraction, source=source, config_section=config_section
    )
    conversations = bad_rows.read(rows, read_conversation)
    report = bad_rows.check(
        kind=f"{fmt} conversation", kinds="conversations", look_at="the format and the `columns` mapping"
    )
    return conversations, report
