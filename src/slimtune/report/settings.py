"""The ``report:`` section of a pipeline recipe (:func:`slimtune.report.html.write_report` options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimtune.config.fields import check_ranges, setting


@dataclass
class ReportSettings:
    """``report:``: HTML + Markdown + JSON trade-off report of a run."""

    title: str | None = setting(None, "Page title (default: the output folder's name).")
    reference: Literal["auto", "finetune", "input"] = setting("auto", "Row retention and ratios refer to (auto: finetune if run, else input).")

    def validate(self, prefix: str = "report") -> None:
        """Ranges (none today; kept so every stage section validates the same way)."""
        check_ranges(self, prefix)
