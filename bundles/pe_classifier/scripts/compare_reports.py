"""Print PE results from several ``metrics_report.json`` side by side, like X-ray2CTPA's table.

    python -m bundles.pe_classifier.scripts.compare_reports --real_ct eval/real --generated_ct eval/gen --xray eval/xray

(console script ``xray2ct-pe-compare``).

Each argument is a report file or the folder holding it. The paper column repeats X-ray2CTPA's published
AUCs (real CTPA 0.83, X-ray 0.69, generated CTPA 0.80) for reference only; they were measured on their data.
"""

from __future__ import annotations

import json
import os

from common.atomic import atomic_write_text
from common.errors import InputError, require_file

PAPER_AUC = {"real CTPA": 0.83, "generated CTPA": 0.80, "X-ray": 0.69}
ROWS = (
    ("real CTPA", "real_ct"),
    ("generated CTPA", "generated_ct"),
    ("X-ray", "xray"),
    ("X-ray + CTPA", "fusion"),
)


def load_report(path: str) -> dict:
    """A ``metrics_report.json`` from a file or folder path."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics_report.json")
    with open(require_file(path)) as f:
        report = json.load(f)
    if "auc" not in report:
        raise InputError(path, "not a PE metrics report (no 'auc')")
    return report


def _fmt(entry: dict | None, digits: int = 3) -> str:
    if not entry or entry.get("estimate") is None:
        return "n/a"
    text = f"{entry['estimate']:.{digits}f}"
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"
    return text


def comparison_table(reports: dict[str, dict]) -> str:
    """A Markdown table: one row per input, AUC/accuracy/sensitivity/specificity with 95% CIs."""
    header = (
        "| input | n (PE+) | AUC [95% CI] | accuracy | sensitivity | specificity | threshold | paper AUC |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for name, r in reports.items():
        paper = PAPER_AUC.get(name)
        lines.append(
            f"| {name} | {r['n_cases']} ({r['n_positive']}) | {_fmt(r.get('auc'))} | {_fmt(r.get('accuracy'))} | "
            f"{_fmt(r.get('sensitivity'))} | {_fmt(r.get('specificity'))} | {r['threshold']['value']:.3f} | "
            f"{'' if paper is None else f'{paper:.2f}'} |"
        )
    return "\n".join(lines)


def compare(
    real_ct: str | None = None,
    generated_ct: str | None = None,
    xray: str | None = None,
    fusion: str | None = None,
    out: str | None = None,
) -> str:
    """Print (and optionally write to ``out``, Markdown) the side-by-side table of the given reports."""
    given = {"real_ct": real_ct, "generated_ct": generated_ct, "xray": xray, "fusion": fusion}
    reports = {name: load_report(given[arg]) for name, arg in ROWS if given[arg]}
    if not reports:
        raise InputError(None, "give at least one of --real_ct, --generated_ct, --xray, --fusion")
    table = comparison_table(reports)
    print(table)
    if out:
        atomic_write_text(out, table + "\n")
    return table


def main() -> None:
    import fire

    fire.Fire(compare)


if __name__ == "__main__":
    main()
