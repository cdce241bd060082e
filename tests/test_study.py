"""benchmarks/study.py: the whole study on a reduced toy budget, its protocol (three disjoint prompt sets, the
replicate as the unit, Holm over every test), and what its report must contain."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats

from common import toy
from evaluate import holm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import study  # noqa: E402

ARMS = ("dpo", "dpok", "sft", "grpo")  # protocol version 2 (docs/study.md)


@pytest.mark.slow  # minutes of toy training: CI's second step (pytest.ini, README "Tests")
def test_study_runs_end_to_end_with_the_replicate_as_unit_and_each_loader_on_its_own_prompts(world, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "benchmarks" / "study.py"), "--budget", "ci", "--seeds", "0", "1",
           "--output-dir", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO)
    report = (out / "report.md").read_text()
    tests = json.loads((out / "tests.json").read_text())
    sets = {"train": toy.TRAIN_PROMPTS, "validation": toy.VALIDATION_PROMPTS, "test": toy.TEST_PROMPTS}
    # every file an arm or a held-out metric reads holds its own prompt set only
    for split, prompts in sets.items():
        assert (out / "data" / f"prompts-{split}.txt").read_text().splitlines() == prompts
        read = set(pq.read_table(out / "data" / "imagereward" / f"metadata-{split}.parquet").column("prompt").to_pylist())
        assert read and read <= set(prompts)
    for seed in (0, 1):
        args = {a: json.loads((out / f"{a}-s{seed}" / "args.json").read_text()) for a in ARMS}
        assert args["dpok"]["prompts"] == args["grpo"]["prompts"] == str(out / "data" / "prompts-train.txt")
        assert args["dpok"]["scorer_path"] == args["grpo"]["scorer_path"] == str(out / f"rm-s{seed}" / "final")
        assert all(args[a]["validation_prompts"] == str(out / "data" / "prompts-validation.txt") for a in ARMS)
        assert args["dpo"]["dataset_source"] == args["sft"]["dataset_source"] == str(out / "data" / "imagereward")
        assert json.loads((out / f"rm-s{seed}" / "args.json").read_text())["imagereward_eval_split"] == "validation"
        checked = {a: json.loads((out / f"{a}-s{seed}" / "eval.json").read_text()) for a in ARMS}  # own checks
        for a in ("dpok", "grpo"):
            assert set(checked[a]["validation_prompts"]) <= set(toy.VALIDATION_PROMPTS)
        for a in ("dpo", "sft"):
            assert checked[a]["reward_prompts"] and set(checked[a]["reward_prompts"]) <= set(toy.VALIDATION_PROMPTS)
        evaluated = json.loads((out / f"evaluate-s{seed}" / "results.json").read_text())
        assert evaluated["args"]["prompts"] == str(out / "data" / "prompts-test.txt") and evaluated["n_prompts"] == 6
        assert evaluated["args"]["seed"] == study.evaluation_seed(seed)  # new noise per replicate, shared by its models
    # the seed-level tests: the paired t-test over replicates on each metric's per-replicate value, against scipy
    values, metrics = study.replicate_values(out, (0, 1), ARMS)
    assert metrics == ["toy", "clip", "reward-model", "fid", "kid", "is"]
    assert len(tests) == 10 * 6 and (tests[0]["a"], tests[0]["b"], tests[0]["metric"]) == ("dpo", "dpok", "toy")
    for t in tests:
        a, b = values[t["a"]][t["metric"]], values[t["b"]][t["metric"]]
        expected = scipy.stats.ttest_rel(a, b).pvalue if np.ptp(a - b) > 0 else float(np.mean(a - b) == 0)
        assert t["p"] == pytest.approx(expected, rel=1e-9, abs=1e-12) and t["n"] == 2
    res = json.loads((out / "evaluate-s1" / "results.json").read_text())
    assert values["dpok"]["toy"][1] == pytest.approx(np.mean(res["runs"]["dpok"]["per_image"]["toy"]))
    assert values["sft"]["fid"][1] == pytest.approx(res["runs"]["sft"]["fid"])
    # Holm over the whole family the report shows (evaluate.py's holm is tested against its formula there)
    assert [t["p_holm"] for t in tests] == pytest.approx(holm([t["p"] for t in tests]))
    # the report: protocol, the verdict from the primary test, then the seed-level table as its first table
    assert report.index("## The protocol") < report.index("**Verdict.**") < report.index("## 1. Seed-level tests")
    first = report[report.index("## 1. Seed-level tests"):].split("\n\n")[2].splitlines()
    assert first[0].startswith("| A vs B | metric |") and first[2].startswith("| dpo vs dpok | toy |")
    assert len(first) == 2 + 60 and "Holm-adjusted over all 60" in report
    primary = tests[0]
    assert f"paired t-test p = {primary['p']:.2g}, Holm-adjusted {primary['p_holm']:.2g}" in report
    assert "win rate" not in report.split("## 1.")[0]  # the verdict comes from the primary test, not a win rate
    assert "| dpok | " in report and "beats base" in report and (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "evaluate-s0" / "rating_kit").is_dir() and not (out / "evaluate-s1" / "rating_kit").exists()
    for arm in ARMS:
        for seed in (0, 1):
            assert f"| {arm} seed {seed} |" in report
    # run again: every step is found done, nothing is retrained, the report is rewritten the same
    stamp = (out / "dpo-s0" / "eval.json").stat().st_mtime_ns
    subprocess.run(cmd, check=True, cwd=REPO)
    assert (out / "dpo-s0" / "eval.json").stat().st_mtime_ns == stamp and (out / "report.md").read_text() == report


def test_seed_level_test_against_scipy_on_known_data():
    a, b = np.array([0.21, 0.25, 0.19, 0.24, 0.22]), np.array([0.17, 0.18, 0.18, 0.20, 0.16])
    got = study.seed_level_test(a, b)
    ref = scipy.stats.ttest_rel(a, b)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-12) and got["diff"] == pytest.approx(np.mean(a - b))
    low, high = ref.confidence_interval(0.95)
    assert got["ci"] == pytest.approx((low, high), rel=1e-12) and got["a_wins"] == 5 and got["n"] == 5
    assert study.seed_level_test(b, a)["p"] == pytest.approx(got["p"]) and study.seed_level_test(b, a)["a_wins"] == 0
    # no spread: exact, without dividing by zero
    assert study.seed_level_test(a + 0.01, a)["p"] == 0.0 and study.seed_level_test(a, a.copy())["p"] == 1.0
    with pytest.raises(ValueError, match="at least 2|>= 2"):
        study.seed_level_test(a[:1], b[:1])


def test_detectable_effect_has_the_stated_power_in_simulation():
    """At the returned δ, the two-sided paired t-test over n replicates rejects at level alpha in 80 % of simulated
    studies (normal d_s with mean δ and sd 1)."""
    rng = np.random.default_rng(0)
    for n, alpha in ((5, 0.05), (5, 0.05 / 60), (8, 0.01)):
        delta = study.detectable_effect(1.0, n, alpha)
        d = rng.normal(delta, 1.0, size=(40_000, n))
        p = scipy.stats.ttest_1samp(d, 0.0, axis=1).pvalue
        assert np.mean(p < alpha) == pytest.approx(0.8, abs=0.012), (n, alpha, delta)
        assert study.detectable_effect(2.0, n, alpha) == pytest.approx(2 * delta)
    assert study.detectable_effect(1.0, 2, 0.05 / 60) > 100  # two replicates see only huge effects at α/60


def test_leak_check_catches_normalised_duplicates_and_real_mode_filters_them(world, tmp_path):
    with pytest.raises(ValueError, match="train and test share 1"):
        study.check_disjoint({"train": ["A red circle on a black background."], "test": ["a red  circle on a BLACK "
                                                                                           "background"]})
    study.check_disjoint({"train": toy.TRAIN_PROMPTS, "validation": toy.VALIDATION_PROMPTS, "test": toy.TEST_PROMPTS})
    # --mode real on local copies: a test prompt that a training row spells differently is dropped from train and
    # validation, and the three sets come out disjoint
    offline = tmp_path / "offline"
    offline.mkdir()  # an ImageRewardDB whose splits are split by prompt, as the real one's are
    (offline / study.OFFLINE["imagereward_db"]).symlink_to(study.prepare_data(study.Args(), tmp_path / "toy")["imagereward"])
    leaked = toy.TRAIN_PROMPTS[0]
    (offline / study.OFFLINE["prompts"]).write_text(f"{leaked.upper()}!\n" + "\n".join(toy.TEST_PROMPTS) + "\n")
    data = study.prepare_data(study.Args(mode="real", offline_dir=str(offline)), tmp_path / "out")
    train = set(pq.read_table(data["imagereward"] / "metadata-train.parquet").column("prompt").to_pylist())
    val = set(pq.read_table(data["imagereward"] / "metadata-validation.parquet").column("prompt").to_pylist())
    test = {study.normalise(p) for p in data["prompt_files"]["test"].read_text().splitlines()}
    assert leaked not in train and train and val and not val & train
    assert not {study.normalise(p) for p in train | val} & test
    assert data["counts"]["train"][1] < data["counts"]["train"][0]


@pytest.mark.slow  # minutes of toy training: CI's second step (pytest.ini, README "Tests")
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


def stand_in(out: Path, phase: str, name: str, code: str, folder: str, reads: tuple[str, ...] = ()):
    """A study step whose script is `code`, then writes done.json (its OpenMP thread cap) and times.json (when it
    started and ended) into its --output-dir; `reads` are other steps' folders its command names, as the real ones do
    (--scorer-path, --candidates)."""
    write = ("import json, os, pathlib, sys, time; d = pathlib.Path(sys.argv[-1]); d.mkdir(); "
             "(d / 'times.json').write_text(json.dumps([t0, time.time()])); "
             "(d / 'done.json').write_text(os.environ.get('OMP_NUM_THREADS', 'unset'))")
    inputs = [f"x={out / f}" for f in reads]
    return phase, name, [sys.executable, "-c", f"import time; t0 = time.time(); {code}; {write}", *inputs,
                         "--output-dir", str(out / folder)], out / folder / "done.json"


def test_parallel_training_runs_all_finish_and_a_failure_is_named(tmp_path, monkeypatch):
    """--jobs 2: the steps run two at a time, each capped to (cores / 2) threads, but the first reward model (it fills
    the embedding cache); one that fails does not stop the others, and the evaluation that reads its output does not
    start: the study stops naming the failed step and its log."""
    out = tmp_path / "study"
    steps = [stand_in(out, "reward models", "reward model seed 0", "pass", "rm"),
             stand_in(out, "training", "dpo seed 0", "import sys; sys.exit(3)", "dpo-s0"),
             stand_in(out, "training", "dpok seed 0", "time.sleep(1)", "dpok-s0", reads=("rm",)),
             stand_in(out, "training", "sft seed 0", "pass", "sft-s0"),
             stand_in(out, "evaluation", "evaluate seed 0", "pass", "evaluate", reads=("dpo-s0", "dpok-s0", "sft-s0"))]
    monkeypatch.setattr(study, "prepare_data", lambda args, out: {})
    monkeypatch.setattr(study, "commands", lambda args, out, data: steps)
    with pytest.raises(ValueError, match=r"dpo seed 0 failed \(exit 3\); see .*dpo_seed_0\.log(.|\n)*not run.*"
                                         r"evaluate seed 0"):
        study.main(study.Args(output_dir=str(out), jobs=2, seeds=(0, 1)))
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert (out / "dpok-s0" / "done.json").read_text() == threads == (out / "sft-s0" / "done.json").read_text()
    assert (out / "rm" / "done.json").read_text() == os.environ.get("OMP_NUM_THREADS", "unset")  # not capped
    assert not (out / "evaluate").exists()
    assert set(json.loads((out / "timings.json").read_text())) == {"reward model seed 0", "dpok seed 0", "sft seed 0"}
    with pytest.raises(ValueError, match="at least 2 distinct seeds"):
        study.main(study.Args(output_dir=str(out), seeds=(0,)))


def test_no_core_waits_for_a_phase_to_end(tmp_path, monkeypatch):
    """A step starts once the steps whose output it reads are done, not when a whole phase is: replicate 1's
    evaluation runs while replicate 0's long DPOK run is still going; an arm on the fitted reward starts only after its
    reward model, and every reward model after the first only after the first (the embedding cache)."""
    out = tmp_path / "study"
    steps = [stand_in(out, "reward models", "reward model seed 0", "time.sleep(0.5)", "rm-s0"),
             stand_in(out, "reward models", "reward model seed 1", "pass", "rm-s1"),
             stand_in(out, "training", "dpok seed 0", "time.sleep(10)", "dpok-s0", reads=("rm-s0",)),
             stand_in(out, "training", "dpo seed 0", "pass", "dpo-s0"),
             stand_in(out, "training", "dpok seed 1", "pass", "dpok-s1", reads=("rm-s1",)),
             stand_in(out, "training", "dpo seed 1", "pass", "dpo-s1"),
             stand_in(out, "evaluation", "evaluate seed 0", "pass", "evaluate-s0", reads=("dpo-s0", "dpok-s0", "rm-s0")),
             stand_in(out, "evaluation", "evaluate seed 1", "pass", "evaluate-s1", reads=("dpo-s1", "dpok-s1", "rm-s1"))]
    monkeypatch.setattr(study, "prepare_data", lambda args, out: {})
    monkeypatch.setattr(study, "commands", lambda args, out, data: steps)
    monkeypatch.setattr(study, "report", lambda *a: ("", []))
    study.main(study.Args(output_dir=str(out), jobs=2, seeds=(0, 1)))
    t = {folder: json.loads((out / folder / "times.json").read_text())
         for folder in ("rm-s0", "rm-s1", "dpok-s0", "dpok-s1", "dpo-s0", "evaluate-s0", "evaluate-s1")}
    assert t["evaluate-s1"][1] < t["dpok-s0"][1]  # replicate 1 evaluated while replicate 0 still trains
    assert t["rm-s0"][1] <= t["rm-s1"][0] and t["rm-s0"][1] <= t["dpok-s0"][0] and t["rm-s1"][1] <= t["dpok-s1"][0]
    assert t["dpok-s0"][1] <= t["evaluate-s0"][0] and t["dpo-s0"][1] <= t["evaluate-s0"][0]
    assert study.prerequisites(steps)["evaluate seed 1"] == {"dpo seed 1", "dpok seed 1", "reward model seed 1"}


def test_grpo_and_draft_arms_train_on_the_replicates_fitted_reward_like_dpok(world, tmp_path):
    """grpo (a protocol arm since version 2) and draft: grpo.py gets replicate s's reward model exactly as dpok.py
    does, the same train and validation prompt files, and its flags parse; evaluate.py compares it with the others.
    rwsft (--arms, the first protocol's fourth arm) gets the same reward model."""
    import grpo
    import sft

    assert study.Args().arms == ("dpo", "dpok", "sft", "grpo")
    args = study.Args(arms=("dpo", "dpok", "rwsft"), seeds=(3, 4))
    out = tmp_path / "study"
    train = {name: cmd for phase, name, cmd, _ in study.commands(args, out, study.prepare_data(args, out))
             if phase == "training"}
    parsed = sft.parse_args(train["rwsft seed 4"][2:])
    assert parsed.scorer == "reward-model" and parsed.scorer_path == str(out / "rm-s4" / "final") and parsed.reg == "kl"
    args = study.Args(arms=("dpo", "dpok", "grpo"), seeds=(3, 4))
    out = tmp_path / "study"
    steps = study.commands(args, out, study.prepare_data(args, out))
    train = {name: cmd for phase, name, cmd, _ in steps if phase == "training"}
    assert sorted(train) == ["dpo seed 3", "dpo seed 4", "dpok seed 3", "dpok seed 4", "grpo seed 3", "grpo seed 4"]
    g, d = train["grpo seed 4"], train["dpok seed 4"]
    assert g[1].endswith("grpo.py")
    for flag in ("--scorer-path", "--prompts", "--validation-prompts", "--seed"):
        assert g[g.index(flag) + 1] == d[d.index(flag) + 1], flag
    parsed = grpo.parse_args(g[2:])
    assert parsed.scorer == "reward-model" and parsed.toy and parsed.seed == 4
    assert parsed.output_dir == str(out / "grpo-s4")
    assert parsed.num_validation_prompts == 24  # its own check at half its toy size, as the other arms'
    assert parsed.steps == grpo.toy_defaults().steps and parsed.learning_rate == grpo.toy_defaults().learning_rate
    evaluate = next(cmd for phase, name, cmd, _ in steps if name == "evaluate seed 4")
    assert f"grpo={out / 'grpo-s4'}" in evaluate
    # what each real command waits for: its replicate's reward model (the arms on the fitted reward), every model of
    # its replicate (the evaluation), the first reward model (the others: the embedding cache); nothing else
    needs = study.prerequisites(steps)
    assert needs["grpo seed 4"] == needs["dpok seed 4"] == {"reward model seed 4"} and needs["dpo seed 4"] == set()
    assert needs["evaluate seed 4"] == {"dpo seed 4", "dpok seed 4", "grpo seed 4", "reward model seed 4"}
    assert needs["reward model seed 4"] == {"reward model seed 3"} and needs["reward model seed 3"] == set()
    import draft

    args = study.Args(arms=("dpo", "dpok", "draft"), seeds=(3, 4))
    train = {name: cmd for phase, name, cmd, _ in study.commands(args, out, study.prepare_data(args, out))
             if phase == "training"}
    r = train["draft seed 3"]
    parsed = draft.parse_args(r[2:])
    assert parsed.scorer == "reward-model" and parsed.scorer_path == str(out / "rm-s3" / "final") and parsed.seed == 3
    import diffusion_kto

    args = study.Args(arms=("dpo", "dpok", "kto"), seeds=(3, 4))
    train = {name: cmd for phase, name, cmd, _ in study.commands(args, out, study.prepare_data(args, out))
             if phase == "training"}
    k, d = train["kto seed 4"], train["dpo seed 4"]
    assert k[k.index("--dataset-source") + 1] == d[d.index("--dataset-source") + 1]  # the same comparisons' images
    assert diffusion_kto.parse_args(k[2:]).dataset == "imagereward"
