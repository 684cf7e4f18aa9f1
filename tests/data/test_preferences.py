import json

import pytest

from data.conversations import parse_hh
from data.preferences import normalize_preferences, pairs_from_order, pairs_from_scores, to_group
from pipeline.errors import DataError
from tests.conftest import SAMPLES


def test_an_order_of_k_completions_yields_every_ordered_pair():
    assert pairs_from_order([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    for k in range(2, 10):
        pairs = pairs_from_order(list(range(k)))
        assert len(pairs) == k * (k - 1) // 2 and len(set(pairs)) == len(pairs)


def test_scores_yield_pairs_best_first_and_ties_yield_none():
    assert sorted(pairs_from_scores([0.5, 2.0, 1.0])) == [(1, 0), (1, 2), (2, 0)]
    # Completions 0 and 2 tie: no pair between them, every other ordered pair remains.
    assert sorted(pairs_from_scores([3, 1, 3, 0])) == [(0, 1), (0, 3), (1, 3), (2, 1), (2, 3)]


def test_hh_pairs_split_off_the_shared_prefix_as_the_prompt():
    row = json.loads((SAMPLES / "hh_harmless_1000.jsonl").read_text().splitlines()[0])
    group = to_group(row)
    chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
    assert group.prompt == chosen[:-1] == rejected[:-1]
    assert group.prompt[-1]["role"] == "user"
    assert group.completions == [chosen, rejected] and group.pairs == [(0, 1)]


def test_ranked_rows_with_text_completions_and_a_plain_prompt():
    group = to_group({"prompt": "Name a fruit.", "completions": ["Apple.", "Rock.", "Pear."], "ranking": [0, 2, 1]})
    assert group.prompt == [{"role": "user", "content": "Name a fruit."}]
    assert group.completions[1] == [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Rock."},
    ]
    assert group.pairs == [(0, 2), (0, 1), (2, 1)]
    by_score = to_group({"prompt": "Q", "completions": ["a", "b"], "scores": [0.1, 0.9]})
    assert by_score.pairs == [(1, 0)]
    as_scores = to_group({"prompt": "Q", "completions": ["a", "b", "c"], "ranking": [1, 5, 1]}, ranking_is="scores")
    assert sorted(as_scores.pairs) == [(1, 0), (1, 2)]


def test_pairwise_rows_with_messages_and_a_margin():
    prompt = [{"role": "user", "content": "Hi"}]
    group = to_group({
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": "Go away.",
        "margin": 2,
    })
    assert group.completions[0] == prompt + [{"role": "assistant", "content": "Hello!"}]
    assert group.completions[1] == prompt + [{"role": "assistant", "content": "Go away."}]
    assert group.margins == [2.0]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": "\n\nHuman: hi\n\nAssistant: yo"}, "missing field 'rejected'"),
        ({"prompt": "Q", "completions": ["a"], "ranking": [0]}, "2 to 9 replies, got 1"),
        ({"prompt": "Q", "completions": ["a"] * 10, "ranking": list(range(10))}, "2 to 9 replies, got 10"),
        ({"prompt": "Q", "completions": ["a", "b"], "ranking": [0, 0]}, "not an order of completion indices"),
        ({"prompt": "Q", "completions": ["a", "b"], "scores": [1, 1]}, "all completions are tied"),
        ({"prompt": "Q", "completions": ["a", "b"]}, "missing field 'ranking'"),
        ({"prompt": "Q", "chosen": "", "rejected": "b"}, "empty chosen reply"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "the same conversation"),
    ],
)
def test_bad_preference_rows_say_what_is_wrong(row, reason):
    groups, report = normalize_preferences([row] + [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 9, max_bad_fraction=0.5)
    assert len(groups) == 9 and report.dropped == 1
    assert any(reason in r for r in report.reasons)
    with pytest.raises(DataError, match=rf"prefs.jsonl: row 1: .*{reason[:12]}"):
        normalize_preferences([row], on_bad_row="error", source="prefs.jsonl")


def test_the_shipped_sample_normalises_completely():
    rows = [json.loads(line) for line in (SAMPLES / "hh_harmless_1000.jsonl").read_text().splitlines()]
    groups, report = normalize_preferences(rows)
    assert report.kept == 1000 and len(groups) == 1000
    assert all(g.prompt and g.prompt[-1]["role"] == "user" for g in groups)
