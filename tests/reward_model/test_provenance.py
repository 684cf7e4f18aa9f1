"""Which preferences a reward model saw, and the held-out pairs it leaves for eval."""

import torch

from data.preferences import normalize_preferences
from data.sources import load_source
from pipeline.config import PreferenceData
from reward_model.evaluation import length_rule_accuracy
from reward_model.provenance import HELD_OUT_NAME, fingerprint, read_trained_on, write_held_out, write_trained_on


def groups_of(rows):
    return normalize_preferences(rows)[0]


def test_held_out_groups_read_back_as_the_same_groups(tmp_path):
    rows = [
        {"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go away."},
        {"prompt": "Rank these", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "Ties", "completions": ["x", "y", "z"], "scores": [1.0, 1.0, 0.0]},
    ]
    groups = groups_of(rows)
    write_held_out(tmp_path, groups)
    read = groups_of(load_source(PreferenceData(path=str(tmp_path / HELD_OUT_NAME))))
    assert [g.completions for g in read] == [g.completions for g in groups]
    assert [sorted(g.pairs) for g in read] == [sorted(g.pairs) for g in groups]
    assert [fingerprint(g) for g in read] == [fingerprint(g) for g in groups]


def test_a_group_is_known_by_its_conversations_wherever_it_came_from(tmp_path):
    text = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}]
    messages = [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                 "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]}]
    assert fingerprint(groups_of(text)[0]) == fingerprint(groups_of(messages)[0])
    other = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}]
    assert fingerprint(groups_of(other)[0]) != fingerprint(groups_of(text)[0])
    write_trained_on(tmp_path, groups_of(text))
    assert read_trained_on(tmp_path) == {fingerprint(groups_of(messages)[0])}
    assert read_trained_on(tmp_path / "elsewhere") == set()  # a model trained outside chatpipe: nothing known


def test_the_length_rule_scores_ties_half():
    assert length_rule_accuracy(torch.tensor([-3, -1, 2, 0])) == (1 + 1 + 0 + 0.5) / 4
