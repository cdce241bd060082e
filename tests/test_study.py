"""benchmarks/study.py: the whole study on a reduced toy budget, and what its report must contain."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

REPO = Path(__file__).resolve().parent.parent
ARMS = ("base", "dpo", "dpok", "sft", "rwsft")
METRICS = ("toy", "clip", "reward-model")


def test_study_runs_end_to_end_and_its_report_answers_the_question(world, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "benchmarks" / "study.py"), "--budget", "ci", "--seeds", "0", "1",
           "--output-dir", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO)
    report = (out / "report.md").read_text()
    results = json.loads((out / "evaluate" / "results.json").read_text())
    # every arm, with its two seeds as units
    assert list(results["models"]) == list(ARMS)
    assert results["arms"]["dpok"] == ["dpok_run0", "dpok_run1"] and results["models"]["dpo"]["n_runs"] == 2
    # all 10 comparisons x 3 metrics, each with intervals and a p-value Holm-adjusted over all 30 cells
    assert len(results["comparisons"]) == 10
    cells = [s for c in results["comparisons"] for s in c["metrics"].values()]
    assert len(cells) == 30 and all(set(c["metrics"]) == set(METRICS) for c in results["comparisons"])
    raw = sorted(s["p_wilcoxon"] for s in cells)
    smallest = min(cells, key=lambda s: s["p_wilcoxon"])
    assert smallest["p_wilcoxon_holm"] == min(1.0, 30 * raw[0])  # the first Holm step multiplies by all 30
    for s in cells:
        assert s["p_wilcoxon_holm"] >= s["p_wilcoxon"] and s["ci_diff"][0] <= s["diff"] <= s["ci_diff"][1]
    seeded = next(c for c in results["comparisons"] if (c["a"], c["b"]) == ("dpok", "base"))["metrics"]["toy"]
    assert seeded["seeds_a"] == 2 and "seeds" in seeded["interval"]
    for arm in ARMS:
        for s in ("fid", "kid", "is"):
            low, high = results["models"][arm]["ci_" + s]
            assert low <= results["models"][arm][s] <= high
    # the report: the verdict, then the first table with one row per arm and every metric's column
    assert "**Verdict.**" in report
    first_table = report[report.index("## Summary"):].split("\n\n")[1]
    rows = [line for line in first_table.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(ARMS)
    header = first_table.splitlines()[0]
    for m in METRICS:
        assert f"{m} mean" in header and f"{m} win vs base (Holm p)" in header and f"{m} win vs dpo (Holm p)" in header
    for s in ("FID", "KID", "IS"):
        assert f"| {s} |" in header or f"| {s}" in header
    dpok_row = next(r for r in rows if r.startswith("| dpok |"))
    assert len(re.findall(r"\[[-0-9.e]+, [-0-9.e]+\] \([0-9.e-]+\)", dpok_row)) == 6  # win rates vs base and dpo
    assert "Holm-adjusted across all 30" in report and "What ran, and how long it took" in report
    # each training run's own check and the rating kit, one page per comparison
    for arm in ARMS[1:]:
        for seed in (0, 1):
            assert f"| {arm} seed {seed} |" in report
    assert len(list((out / "evaluate" / "rating_kit").glob("page_*.html"))) == 10
    # each seed of each arm against the base, images as units: the p equal scipy's paired t-test and Wilcoxon on the images
    per_run = report[report.index("## Each run against the base on the held-out prompts"):].split("\n\n")[2]
    row = next(line for line in per_run.splitlines() if line.startswith("| dpok seed 1 |"))
    base, run = (np.ravel(results["runs"][r]["per_image"]["toy"]) for r in ("base", "dpok_run1"))
    p = scipy.stats.wilcoxon(run[run != base] - base[run != base]).pvalue
    t = scipy.stats.ttest_rel(run, base).pvalue
    assert row.split(" | ")[1] == f"{base.mean():.4g} -> {run.mean():.4g} (t {t:.2g}; W {p:.2g})"
    # run again: every step is found done, nothing is retrained, the report is rewritten the same
    stamp = (out / "dpo-s0" / "eval.json").stat().st_mtime_ns
    subprocess.run(cmd, check=True, cwd=REPO)
    assert (out / "dpo-s0" / "eval.json").stat().st_mtime_ns == stamp and (out / "report.md").read_text() == report


def test_below_base_warning_fires_on_a_run_made_to_fail(world, tmp_path):
    """Diffusion-DPO on a Pick-a-Pic copy whose labels are swapped (every loser marked the winner, as a label bug
    would): the model learns smaller shapes, and the run must say so at the end and in eval.json, not only exit 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "pickapic_flipped"
    for split in ("train", "validation"):
        table = pq.read_table(world.pickapic / split / "part-0.parquet")
        cols = {name: table.column(name) for name in table.column_names}
        cols["label_0"], cols["label_1"] = cols["label_1"], cols["label_0"]
        (data / split).mkdir(parents=True)
        pq.write_table(pa.table(cols), data / split / "part-0.parquet")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "diffusion_dpo.py"), "--toy", "--dataset-source", str(data),
                           "--output-dir", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["eval/reward_final"] < result["eval/reward_base"]
    assert "BELOW the base model's" in result["warning"] and "WARNING: the trained model's" in proc.stderr


def test_parallel_training_runs_all_finish_and_a_failure_is_named(tmp_path, monkeypatch):
    """--jobs 2: the training steps run two at a time, each capped to (cores / 2) threads; one that fails does not
    stop the others, and the study stops before the evaluation naming the failed step and its log."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import study

    out = tmp_path / "study"

    def step(name: str, code: str, folder: str):  # a stand-in script: writes done.json into its --output-dir
        write = "import os, pathlib, sys; d = pathlib.Path(sys.argv[-1]); d.mkdir(); " \
                "(d / 'done.json').write_text(os.environ.get('OMP_NUM_THREADS', 'unset'))"
        return name, [sys.executable, "-c", f"{code}; {write}", "--output-dir", str(out / folder)], \
            out / folder / "done.json"

    steps = [step("reward model", "pass", "rm"), step("dpo seed 0", "import sys; sys.exit(3)", "dpo-s0"),
             step("dpok seed 0", "import time; time.sleep(1)", "dpok-s0"), step("sft seed 0", "pass", "sft-s0"),
             step("evaluate", "pass", "evaluate")]
    monkeypatch.setattr(study, "commands", lambda args, out: steps)
    with pytest.raises(ValueError, match=r"dpo seed 0 failed \(exit 3\); see .*dpo_seed_0\.log"):
        study.main(study.Args(output_dir=str(out), jobs=2))
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert (out / "dpok-s0" / "done.json").read_text() == threads == (out / "sft-s0" / "done.json").read_text()
    assert (out / "rm" / "done.json").exists() and not (out / "evaluate").exists()
    assert set(json.loads((out / "timings.json").read_text())) == {"reward model", "dpok seed 0", "sft seed 0"}
