"""Reading back a stage's metrics.jsonl: rows in the order logged, unreadable lines counted."""

import json

from pipeline.orchestration.tracking import METRICS_NAME, read_metric_rows


def test_rows_come_back_in_the_order_logged_and_unreadable_lines_are_counted(tmp_path):
    first_attempt = [{"step": 10, "train/loss": 2.0}, {"step": 20, "train/loss": 1.5}]
    resumed = [{"step": 20, "train/loss": 1.4}, {"step": 30, "train/loss": 1.2}]
    lines = [json.dumps(row) for row in first_attempt] + ["", '{"train/loss": 9.0}', '"just a string"']
    lines += [json.dumps(row) for row in resumed] + ['{"step": 40, "train/lo']
    (tmp_path / METRICS_NAME).write_text("\n".join(lines))

    rows, unreadable = read_metric_rows(tmp_path)

    assert rows == first_attempt + resumed  # a resumed stage's rows follow the first attempt's
    assert unreadable == 3  # no step, not a row, and the torn last line of a killed stage


def test_a_stage_that_logged_nothing_has_no_rows(tmp_path):
    assert read_metric_rows(tmp_path / "never-ran") == ([], 0)
