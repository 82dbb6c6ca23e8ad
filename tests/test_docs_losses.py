"""docs/losses.md stays true: its table is the one generated from the loss registry."""

from __future__ import annotations

import re
from pathlib import Path

from preftune.losses import DOCS_BEGIN, DOCS_END, LOSSES, losses_table_markdown, update_docs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
REGENERATE = "regenerate it with: PYTHONPATH=src python -m preftune.losses docs/losses.md"


def generated_section(text: str) -> str:
    match = re.search(re.escape(DOCS_BEGIN) + r"\n(.*?)" + re.escape(DOCS_END), text, re.DOTALL)
    assert match, f"docs/losses.md lost its generated section; {REGENERATE}"
    return match.group(1)


def test_docs_table_is_the_generated_one():
    assert generated_section(DOCS.read_text(encoding="utf-8")) == losses_table_markdown(), (
        f"docs/losses.md is out of date with the registry in losses.py; {REGENERATE}"
    )


def test_table_has_one_row_per_loss_with_its_reference_need():
    rows = [line for line in losses_table_markdown().splitlines() if line.startswith("| `")]
    names = [row.split("|")[1].strip().strip("`") for row in rows]
    assert names[: len(LOSSES)] == list(LOSSES)
    for row, (name, spec) in zip(rows, LOSSES.items()):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) == 8, row
        assert cells[3] == ("yes" if spec.needs_reference else "no"), name
        assert cells[4] == spec.beta and cells[5] == spec.lr, name
    # The DPO row, spelled out: the formula, the paper's equation and its values, the flags it uses.
    assert rows[0] == (
        "| `sigmoid` | −log σ(βh); with ε > 0 (cDPO): −(1−ε) log σ(βh) − ε log σ(−βh) | Rafailov et al. "
        "2023, Direct Preference Optimization: Your Language Model is Secretly a Reward Model (arXiv "
        "2305.18290), Eq. 7; cDPO: Mitchell 2023, A note on DPO with noisy preferences & relationship "
        "to IPO (ericmitchell.ai/cdpo.pdf), Eq. 3 | yes | 0.1 | 1e-6 | β hw | `--beta`, `--f-alpha`, "
        "`--f-divergence`, `--label-smoothing` |"
    )
    # |y| inside a cell is escaped, so the row keeps its 8 cells.
    assert "hw/\\|yw\\|" in rows[names.index("ipo")]


def test_update_docs_rewrites_only_the_generated_section(tmp_path):
    page = tmp_path / "losses.md"
    page.write_text(f"# intro\n\n{DOCS_BEGIN}\n| stale |\n{DOCS_END}\n\nnotes stay\n", encoding="utf-8")
    update_docs(page)
    assert page.read_text(encoding="utf-8") == (
        f"# intro\n\n{DOCS_BEGIN}\n{losses_table_markdown()}{DOCS_END}\n\nnotes stay\n"
    )
