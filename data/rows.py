"""The bad-row policy every dataset loader applies: which unusable rows are skipped, and when loading stops.

    bad_rows = BadRows(on_bad_row="drop", max_bad_fraction=0.1, source="data/sft.jsonl", config_section="sft")
    conversations = bad_rows.read(rows, to_conversation)   # to_conversation raises RowError on a bad row
    bad_rows.check(kind="messages conversation", kinds="conversations", look_at="the format and the `columns` mapping")
    bad_rows.report.summary()                              # "kept 990 of 1000 rows; dropped 10 (1.0%): ..."

Conversations (SFT, PPO prompts) and preferences (reward, eval) are read row by row, and a row
either becomes one item or raises a `RowError` saying what is wrong with it. What happens next is
the same for every loader, so it is written here once: with `on_bad_row: error` the first bad row
stops loading with a `DataError` naming the file and the row (counting from 1); with `drop` bad
rows are skipped and counted per reason, and loading stops when none is usable, or when more than
`max_bad_fraction` are not, since that usually means the wrong format or column mapping rather
than a few broken rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from pipeline.errors import ConfigError, DataError

BAD_ROW_POLICIES = ("drop", "error")
MAX_EXAMPLES = 5

Item = TypeVar("Item")


class RowError(ValueError):
    """Why one row is unusable, e.g. "missing field 'response'" or "no assistant turn".

    Messages name no row number or position, so equal problems count as one reason in a `RowReport`.
    """


@dataclass
class RowReport:
    """What a loader kept and dropped, and why.

    `reasons` counts dropped rows per RowError message; `examples` holds the first few as
    "row N: reason" (N counts from 1).
    """

    total: int = 0
    kept: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def dropped_fraction(self) -> float:
        """dropped / total (0.0 for no rows)."""
        return self.dropped / self.total if self.total else 0.0

    def record_drop(self, row_number: int, reason: str) -> None:
        """Count one dropped row (1-based `row_number`)."""
        self.dropped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"row {row_number}: {reason}")

    def top_reasons(self, limit: int = 3) -> str:
        """The most common reasons with counts: "empty assistant reply (7), no assistant turn (3)"."""
        return ", ".join(f"{reason} ({count})" for reason, count in Counter(self.reasons).most_common(limit))

    def summary(self) -> str:
        """One line: "kept 990 of 1000 rows; dropped 10 (1.0%): empty assistant reply (7), ..."."""
        line = f"kept {self.kept} of {self.total} rows"
        if self.dropped:
            line += f"; dropped {self.dropped} ({self.dropped_fraction:.1%}): {self.top_reasons()}"
        return line


class BadRows:
    """The bad-row policy for one file: `read` its rows, then `check` what was dropped.

    `source` names the file in every message, and `config_section` the section whose
    `on_bad_row` / `max_bad_fraction` settings change the behaviour, so a message says what to set.
    """

    def __init__(
        self,
        *,
        on_bad_row: str = "drop",
        max_bad_fraction: float = 0.1,
        source: str = "<data>",
        config_section: str,
    ):
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ConfigError(
                f"{config_section}.on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, not {on_bad_row!r}"
            )
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"{config_section}.max_bad_fraction must be between 0 and 1, not {max_bad_fraction}")
        self.on_bad_row, self.max_bad_fraction = on_bad_row, max_bad_fraction
        self.source, self.config_section = source, config_section
        self.report = RowReport()

    def read(self, rows: Iterable[dict], read_row: Callable[[dict], Item]) -> list[Item]:
        """`read_row` of every row, in order, less the rows it rejects with a RowError.

        Under `on_bad_row: error` the first rejected row is a DataError naming the file and the row.
        Any other exception from `read_row` (a FormatError, say: the whole file is wrong) passes through.
        """
        items: list[Item] = []
        for row_number, row in enumerate(rows, start=1):
            self.report.total += 1
            try:
                items.append(read_row(row))
            except RowError as error:
                if self.on_bad_row == "error":
                    raise DataError(
                        f"{self.source}: row {row_number}: {error}; fix the row, "
                        f"or set {self.config_section}.on_bad_row: drop to skip such rows"
                    ) from error
                self.report.record_drop(row_number, str(error))
        self.report.kept = len(items)
        return items

    def check(self, *, kind: str, kinds: str, look_at: str) -> RowReport:
        """The report, or a DataError when nothing was read, nothing is usable, or too much was dropped.

        Messages call one item a `kind` ("messages conversation") and many `kinds` ("conversations"),
        and say to check `look_at` ("the format and the `columns` mapping") against the data.
        """
        report, source, section = self.report, self.source, self.config_section
        if report.total == 0:
            raise DataError(f"{source}: no rows; point the data source at a file or split with {kinds}")
        if report.kept == 0:
            raise DataError(
                f"{source}: none of the {report.total} rows is a usable {kind} "
                f"({report.top_reasons()}; e.g. {'; '.join(report.examples)}); "
                f"check {look_at} against the data"
            )
        if report.dropped_fraction > self.max_bad_fraction:
            raise DataError(
                f"{source}: {report.dropped} of {report.total} rows ({report.dropped_fraction:.1%}) are unusable, "
                f"more than {section}.max_bad_fraction ({self.max_bad_fraction:.1%}); "
                f"most common: {report.top_reasons()}; e.g. {'; '.join(report.examples)}. "
                f"Check {look_at} against the data, or raise {section}.max_bad_fraction to train without them"
            )
        return report
