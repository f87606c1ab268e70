"""What an evaluator returns, and how the pipeline writes it (summary.json, eval.md, loggers)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    """A Markdown table of the run dir's ``eval.md``: numbers are formatted, the rest printed as is."""

    title: str
    header: list[str]
    rows: list[list]

    def markdown(self) -> str:
        def cell(v) -> str:
            if isinstance(v, float):
                return f"{v:.4f}"
            return str(v)

        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


@dataclass
class EvalResult:
    """``metrics``: flat scalars (logged as ``eval/<evaluator>/<name>``); ``tables`` go to eval.md;
    ``details``: anything JSON-able kept in summary.json under the evaluator's name."""

    metrics: dict[str, float]
    tables: list[Table] = field(default_factory=list)
    details: dict = field(default_factory=dict)
