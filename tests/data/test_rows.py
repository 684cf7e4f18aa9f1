"""The bad-row policy shared by every loader: what is kept, what is counted, when loading stops."""

import pytest

from data.preferences import normalize_preferences
from data.rows import BadRows, RowError, RowReport
from pipeline.errors import ConfigError, DataError


def even_only(row: dict) -> int:
    """A row reader that takes even numbers and rejects odd ones, the way a loader rejects bad rows."""
    if row["n"] % 2:
        raise RowError("odd number")
    return row["n"]


def numbers(*values: int) -> list[dict]:
    return [{"n": value} for value in values]


def test_summary_of_a_clean_run():
    assert RowReport(total=3, kept=3).summary() == "kept 3 of 3 rows"


def test_drop_keeps_good_rows_in_order_and_counts_the_rest():
    bad_rows = BadRows(max_bad_fraction=0.5, source="numbers.jsonl", config_section="sft")
    assert bad_rows.read(numbers(4, 1, 2, 3, 6, 8), even_only) == [4, 2, 6, 8]
    report = bad_rows.check(kind="number", kinds="numbers", look_at="the numbers")
    assert (report.total, report.kept, report.dropped) == (6, 4, 2)
    assert report.reasons == {"odd number": 2}
    assert report.examples == ["row 2: odd number", "row 4: odd number"]
    assert report.summary() == "kept 4 of 6 rows; dropped 2 (33.3%): odd number (2)"


def test_only_the_first_examples_are_kept():
    bad_rows = BadRows(max_bad_fraction=1.0, config_section="sft")
    bad_rows.read(numbers(*range(1, 20, 2), 2), even_only)
    assert bad_rows.report.dropped == 10
    assert bad_rows.report.examples == [f"row {n}: odd number" for n in range(1, 6)]


def test_error_policy_stops_at_the_first_bad_row_naming_file_row_and_setting():
    bad_rows = BadRows(on_bad_row="error", source="numbers.jsonl", config_section="reward")
    with pytest.raises(DataError) as caught:
        bad_rows.read(numbers(2, 4, 5, 7), even_only)
    assert str(caught.value) == (
        "numbers.jsonl: row 3: odd number; fix the row, or set reward.on_bad_row: drop to skip such rows"
    )


def test_other_errors_from_the_reader_pass_through():
    def broken(row):
        raise DataError("the whole file is wrong")

    with pytest.raises(DataError, match="the whole file is wrong"):
        BadRows(config_section="sft").read(numbers(2), broken)


@pytest.mark.parametrize(
    "values, message",
    [
        ((), "numbers.jsonl: no rows; point the data source at a file or split with numbers"),
        ((1, 3), "numbers.jsonl: none of the 2 rows is a usable number (odd number (2); e.g. row 1: odd number; "
                 "row 2: odd number); check the numbers against the data"),
        ((2, 4, 1, 3), "numbers.jsonl: 2 of 4 rows (50.0%) are unusable, more than ppo.max_bad_fraction (25.0%); "
                       "most common: odd number (2); e.g. row 3: odd number; row 4: odd number. "
                       "Check the numbers against the data, or raise ppo.max_bad_fraction to train without them"),
    ],
)
def test_loading_stops_on_no_rows_no_usable_row_or_too_many_dropped(values, message):
    bad_rows = BadRows(max_bad_fraction=0.25, source="numbers.jsonl", config_section="ppo")
    bad_rows.read(numbers(*values), even_only)
    with pytest.raises(DataError) as caught:
        bad_rows.check(kind="number", kinds="numbers", look_at="the numbers")
    assert str(caught.value) == message


def test_the_limit_itself_is_allowed():
    bad_rows = BadRows(max_bad_fraction=0.25, config_section="sft")
    bad_rows.read(numbers(2, 4, 6, 1), even_only)
    assert bad_rows.check(kind="number", kinds="numbers", look_at="the numbers").dropped_fraction == 0.25


def test_settings_outside_the_policy_name_the_key():
    with pytest.raises(ConfigError, match="reward.on_bad_row must be one of drop, error, not 'skip'"):
        BadRows(on_bad_row="skip", config_section="reward")
    with pytest.raises(ConfigError, match="sft.max_bad_fraction must be between 0 and 1, not 1.5"):
        BadRows(max_bad_fraction=1.5, config_section="sft")


def test_preferences_stop_with_the_same_messages_as_conversations():
    bad = {"prompt": "Q", "chosen": "", "rejected": "b"}
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match=r"prefs.jsonl: 1 of 4 rows \(25.0%\) are unusable, more than reward.max_bad_fraction"):
        normalize_preferences([good, good, bad, good], source="prefs.jsonl")
    with pytest.raises(DataError, match="prefs.jsonl: none of the 1 rows is a usable preference"):
        normalize_preferences([bad], max_bad_fraction=1.0, source="prefs.jsonl")
    with pytest.raises(DataError, match="prefs.jsonl: no rows"):
        normalize_preferences([], source="prefs.jsonl")
