"""The reward model's score statistics as a file in its checkpoint folder."""

import json

import pytest

from pipeline.errors import ManifestError
from reward_model.statistics import STATISTICS_NAME, ScoreStatistics


def test_statistics_read_back_exactly_as_written(tmp_path):
    # Values as the reward stage measures them: full float64 precision must survive the file.
    written = ScoreStatistics(mean=0.1234567890123456789, std=1 / 3)
    path = written.write(tmp_path / "reward" / "final")
    assert path == tmp_path / "reward" / "final" / STATISTICS_NAME
    read = ScoreStatistics.read(tmp_path / "reward" / "final")
    assert read == written and read.mean == 0.1234567890123456789 and read.std == 1 / 3


def test_a_reward_folder_from_before_the_file_says_to_rerun_the_reward_stage(tmp_path):
    with pytest.raises(ManifestError, match=rf"{tmp_path}: no {STATISTICS_NAME} .*rerun the reward stage"):
        ScoreStatistics.read(tmp_path)


@pytest.mark.parametrize(
    "content",
    ['{"mean": 0.1', '[0.1, 1.0]', '{"mean": 0.1}', '{"mean": "0.1", "std": 1.0}', '{"mean": 0.1, "std": -1.0}',
     '{"mean": NaN, "std": 1.0}', '{"mean": true, "std": 1.0}', '{"mean": 0.1, "std": 1.0, "length_slope": "x"}',
     '{"mean": 0.1, "std": 1.0, "length_mean": Infinity}'],
)
def test_an_unreadable_statistics_file_is_a_clear_error_naming_it(tmp_path, content):
    (tmp_path / STATISTICS_NAME).write_text(content)
    with pytest.raises(ManifestError, match=rf"{tmp_path / STATISTICS_NAME}: .*rerun the reward stage"):
        ScoreStatistics.read(tmp_path)


def test_the_file_is_plain_json_with_mean_std_and_the_length_trend(tmp_path):
    ScoreStatistics(mean=-0.5, std=2.0, length_slope=-0.01, length_mean=40.0).write(tmp_path)
    assert json.loads((tmp_path / STATISTICS_NAME).read_text()) == {"mean": -0.5, "std": 2.0, "length_slope": -0.01, "length_mean": 40.0}


def test_a_file_from_before_the_length_trend_reads_with_no_trend(tmp_path):
    (tmp_path / STATISTICS_NAME).write_text('{"mean": 0.25, "std": 1.5}')
    assert ScoreStatistics.read(tmp_path) == ScoreStatistics(mean=0.25, std=1.5, length_slope=0.0, length_mean=0.0)
