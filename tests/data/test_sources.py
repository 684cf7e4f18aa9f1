"""Local data files that cannot be used: each DataError names the file, the line or row, and what is wrong.

Files go through the loaders the stages use: `load_conversations` (sft, ppo prompts, eval) and
`load_source` + `normalize_preferences` (reward), with `on_bad_row: error`.
"""

import json
import time
from pathlib import Path

import pytest

from data.chat_tokens import load_conversations
from data.preferences import normalize_preferences
from data.sources import load_source
from pipeline.config import BadRowPolicy, ConversationData, PreferenceData
from pipeline.errors import DataError

HH_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "samples" / "hh_harmless_1000.jsonl"
STRICT = BadRowPolicy(on_bad_row="error")


def jsonl(*rows) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def chat(question="Hi", answer="Hello"):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def load_sft(path, cache_dir):
    return load_conversations(ConversationData(path=str(path)), STRICT, cache_dir)


def load_reward(path, cache_dir):
    return normalize_preferences(
        load_source(PreferenceData(path=str(path)), cache_dir=cache_dir), on_bad_row="error", source=str(path)
    )


BAD_INPUTS = {
    # name: (loader, file bytes, pieces the message must hold besides the file name)
    "empty file": (load_sft, b"", ["empty file: no rows"]),
    "blank lines only": (load_reward, b"\n  \n\n", ["empty file: no rows"]),
    "malformed JSON line": (load_sft, jsonl(chat(), chat(), b'{"messages" [}'), ["line 3: not valid JSON (Expecting ':' delimiter at column 13)"]),
    "JSON line that is not an object": (load_reward, jsonl({"chosen": "a", "rejected": "b"}, b"[1, 2]"), ["line 2: a JSON list, not an object"]),
    "non-UTF-8 byte": (load_sft, jsonl(chat(), chat()) + b'{"messages": "caf\xe9"}\n', ["line 3: not UTF-8 (byte 0xe9 at column 18)"]),
    "binary file": (load_reward, bytes(range(256)) * 8, ["line 1: not text (NUL byte 0x00 at column 1)", "binary file"]),
    "missing column in one row": (load_sft, jsonl(chat(), {"other": 1}), ["row 2: missing field 'messages'"]),
    "no usable column": (load_sft, jsonl({"question": "q", "answer": "a"}), ["no conversation format fits the columns [question, answer]"]),
    "content of the wrong type": (load_sft, jsonl(chat(), chat(answer=5)), ["row 2: assistant message content is int"]),
    "messages not a list": (load_sft, jsonl(chat(), {"messages": "Hi there"}), ["row 2: messages is str"]),
    "non-text content part": (
        load_sft,
        jsonl(chat(), {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                                    {"role": "assistant", "content": "A cat."}]}),
        ["row 2: user message has a 'image_url' content part; only text parts are read"],
    ),
    "audio part in a preference": (
        load_reward,
        jsonl({"prompt": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]}],
               "chosen": "yes", "rejected": "no"}),
        ["row 1: user message has a 'input_audio' content part"],
    ),
    "unknown ShareGPT speaker": (load_sft, jsonl({"conversations": [{"from": "bot", "value": "Hi"}]}), ["row 1: unknown role 'bot'"]),
    "preference side of the wrong type": (load_reward, jsonl({"chosen": "a", "rejected": 3}), ["row 1: rejected is int"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_unusable_file_is_a_data_error_naming_file_and_line(name, tmp_path):
    loader, content, pieces = BAD_INPUTS[name]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        loader(path, tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for piece in pieces:
        assert piece in message, message
    assert "DatasetGenerationError" not in message and "StopIteration" not in message


def test_clean_file_loads_and_check_keeps_sample_fast(tmp_path):
    # The UTF-8 scan is the only extra work on a good file; it must stay small beside the load itself.
    from data.sources import check_local_file

    start = time.perf_counter()
    for _ in range(10):
        check_local_file(str(HH_SAMPLE))
    per_scan = (time.perf_counter() - start) / 10
    groups, report = load_reward(HH_SAMPLE, tmp_path / "cache")
    assert report.total == 1000 and len(groups) == report.kept
    assert per_scan < 0.05, f"scanning the 1.4 MB sample took {per_scan * 1000:.1f} ms"


def test_bom_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(chat("a"), b"", chat("b")))
    conversations, report = load_sft(path, tmp_path / "cache")
    assert [c[0]["content"] for c in conversations] == ["a", "b"]


def test_a_line_longer_than_the_json_reader_chunks_is_read(tmp_path):
    # datasets reads JSON lines in 10 MB chunks parsed in 320 kB pyarrow blocks; a 12 MB line exceeds both.
    long_answer = "word " * ((12 << 20) // 5)
    path = tmp_path / "long.jsonl"
    path.write_bytes(jsonl(chat("first"), chat("long", long_answer), chat("last")))
    assert path.stat().st_size > 12 << 20
    conversations, report = load_sft(path, tmp_path / "cache")
    assert report.kept == 3
    assert conversations[1][1]["content"] == long_answer
    assert [c[0]["content"] for c in conversations] == ["first", "long", "last"]


# ------------------------------------------------------------------------------ streamed texts


def streamed(source, cache_dir, **options) -> list[str]:
    from data.sources import stream_texts

    return [text for batch in stream_texts(source, cache_dir, **options) for text in batch]


def test_a_hub_dataset_is_streamed_and_max_rows_reads_no_further(tmp_path):
    """The hub path, run on a local dataset folder: rows come as they are read, with no Arrow copy."""
    from pipeline.config import DataSource

    repo = tmp_path / "org-corpus"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_bytes(jsonl(*({"body": f"document {n}", "id": n} for n in range(5000))))
    cache = tmp_path / "cache"
    texts = streamed(DataSource(hub=str(repo), text_field="body", max_rows=3), cache)
    assert texts == ["document 0", "document 1", "document 2"]
    assert not list(cache.rglob("*.arrow"))  # nothing downloaded or converted whole
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, id\); set `text_field:`"):
        streamed(DataSource(hub=str(repo)), cache)


def test_max_chars_cuts_the_stream_and_empty_documents_are_left_out(tmp_path):
    from pipeline.config import DataSource

    path = tmp_path / "corpus.jsonl"
    path.write_bytes(jsonl({"text": "abcdef"}, {"text": ""}, {"text": None}, {"text": "ghij"}, {"text": "never read"}))
    assert streamed(DataSource(path=str(path)), tmp_path / "cache") == ["abcdef", "ghij", "never read"]
    assert streamed(DataSource(path=str(path)), tmp_path / "cache", max_chars=8) == ["abcdef", "gh"]


def test_a_broken_line_met_while_streaming_names_the_line(tmp_path):
    from pipeline.config import DataSource

    path = tmp_path / "corpus.jsonl"
    path.write_bytes(jsonl(*({"text": f"row {n}"} for n in range(2000)), b'{"text": "unterminated', {"text": "after"}))
    with pytest.raises(DataError, match=r"corpus.jsonl: line 2001: not valid JSON"):
        streamed(DataSource(path=str(path)), tmp_path / "cache")


def arrow_file(cache_dir) -> Path:
    (path,) = Path(cache_dir).rglob("*.arrow")
    return path


@pytest.mark.parametrize("damage", ["flipped byte", "garbage"])
def test_a_damaged_datasets_cache_is_named_and_prepared_again(tmp_path, caplog, damage):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl(*(chat(f"question {i}", f"answer {i}") for i in range(20))))
    cache = tmp_path / "cache"
    conversations, _ = load_sft(path, cache)
    arrow = arrow_file(cache)
    data = bytearray(arrow.read_bytes())
    if damage == "flipped byte":  # still loads: "answer 7" becomes "answer 6"
        data[data.index(b"answer 7") + 7] ^= 0x01
    else:
        data = bytearray(b"not an arrow file")
    arrow.write_bytes(bytes(data))

    assert load_sft(path, cache)[0] == conversations
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert (str(arrow) if damage == "flipped byte" else f"the datasets cache {cache} could not be read") in warning
    assert "prepar" in warning and "again" in warning
    caplog.clear()
    assert load_sft(path, cache)[0] == conversations and not caplog.records  # repaired for good


# ------------------------------------------------------------------------------ what is not bad data


def test_a_bug_in_the_loading_code_is_not_reported_as_bad_data(tmp_path, monkeypatch):
    """Only what the data path raises becomes a DataError; a TypeError of our own keeps its traceback."""
    import datasets

    from pipeline.config import DataSource

    path = tmp_path / "corpus.jsonl"
    path.write_bytes(jsonl({"text": "a"}))

    def buggy(*args, **kwargs):
        raise TypeError("load_dataset() got an unexpected keyword argument 'sample_by'")

    monkeypatch.setattr(datasets, "load_dataset", buggy)
    for load in (lambda: load_source(DataSource(path=str(path)), tmp_path / "cache"),
                 lambda: load_source(DataSource(path=str(path))),
                 lambda: streamed(DataSource(path=str(path)), tmp_path / "cache")):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            load()


def test_a_data_error_keeps_what_datasets_raised_as_its_cause(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"not parquet at all")
    from pipeline.config import DataSource

    with pytest.raises(DataError, match=rf"{path}: could not load dataset") as caught:
        load_source(DataSource(path=str(path)), tmp_path / "cache")
    assert caught.value.__cause__ is not None and not isinstance(caught.value.__cause__, DataError)
