"""One vocabulary: every script's --help uses the README's flag table, which is the source of truth."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("diffusion_dpo", "diffusion_kto", "dpok", "grpo", "draft", "sft", "reward_model", "evaluate", "rating_kit")


def vocabulary() -> list[dict]:
    """The rows of the README's table under '## One vocabulary': flags, the scripts that have them, banned spellings."""
    text = REPO.joinpath("README.md").read_text()
    section = text.split("## One vocabulary", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`--"):
            continue
        rows.append(dict(concept=cells[0], flags=re.findall(r"`(--[a-z0-9-]+)`", cells[1]),
                         scripts=cells[2].split(), banned=re.findall(r"`(--[a-z0-9-]+)`", cells[3])))
    return rows


@pytest.fixture(scope="module")
def helps() -> dict[str, set[str]]:
    """Every flag each script's --help lists."""
    out = {}
    for name in SCRIPTS:
        res = subprocess.run([sys.executable, str(REPO / f"{name}.py"), "--help"], cwd=REPO, capture_output=True,
                             text=True, env={"COLUMNS": "200", "PATH": "", "HF_HUB_OFFLINE": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        # tyro's help box: a flag is defined where a line starts "│ --flag"; mentions inside descriptions are
        # indented further and do not count
        out[name] = set(re.findall(r"(?m)^\S (--[a-z0-9][a-z0-9-]*)", res.stdout))
    return out


def test_the_table_is_read():
    rows = vocabulary()
    assert len(rows) >= 20 and all(set(r["scripts"]) <= set(SCRIPTS) and r["scripts"] for r in rows)


@pytest.mark.parametrize("row", vocabulary(), ids=lambda r: r["flags"][0])
def test_every_script_uses_the_shared_flag_name(row, helps):
    for name in row["scripts"]:
        missing = [f for f in row["flags"] if f not in helps[name]]
        assert not missing, f"{name}.py --help lacks {missing} ({row['concept']})"
    for name in SCRIPTS:
        used = [f for f in row["banned"] if f in helps[name]]
        assert not used, f"{name}.py spells '{row['concept']}' as {used}; the table says {row['flags']}"


def test_rating_kit_speaks_evaluates_words(helps):
    """rating_kit.py is evaluate.py's --ingest-ratings on its own: every flag it has is evaluate.py's flag of that name."""
    assert helps["rating_kit"] and helps["rating_kit"] <= helps["evaluate"], helps["rating_kit"] - helps["evaluate"]
