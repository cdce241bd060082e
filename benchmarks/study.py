"""The study as one command: does Diffusion-DPO on ImageReward's comparisons match DPOK on a reward model fitted to the
same data, and how do both compare with the supervised baselines?

This file only calls the scripts, in the order a researcher would (CleanRL's benchmark/ folder does the same):

    1. reward_model.py    fit r_φ on ImageRewardDB's rankings (Bradley-Terry)                        -> rm/final
    2. per seed s in --seeds, the four arms, each on the same data:
       dpo    diffusion_dpo.py --dataset imagereward                  Diffusion-DPO on the comparisons
       dpok   dpok.py --scorer reward-model --scorer-path rm/final    DPOK on the fitted reward
       sft    sft.py --data preferred --dataset imagereward           SFT on the preferred images
       rwsft  sft.py --data generated --scorer reward-model --reg kl  reward-weighted SFT with the KL regulariser
    3. evaluate.py        every arm (its seeds as units) against the base and against each other, on prompts no arm
                          trained on, Holm across every comparison x metric; the double-blind rating kit
    4. report.md          the question, the first table (per arm: the mean over seeds of each metric with its interval,
                          win rates against the base and against Diffusion-DPO, Holm-adjusted p), each script's own
                          base-vs-final check, the commands and how long each took

Toy (the default): the offline toy world. The arms train on TRAIN_PROMPTS only (a copy of the toy ImageRewardDB
that keeps their rows; common/toy.py) and are evaluated on HELDOUT_PROMPTS. --budget ci shrinks every step to
seconds (tests/test_study.py). Real (--mode real): SD1.5, ImageRewardDB from a local folder, PartiPrompts for
evaluation, --gpus per step through torchrun; the scripts' own defaults (the papers' recipes) otherwise.

Usage:
    python benchmarks/study.py                                   # toy, 3 seeds per arm, CPU
    python benchmarks/study.py --budget ci --seeds 0 1           # the reduced budget of the CI test
    python benchmarks/study.py --mode real --dataset-source /data/ImageRewardDB --gpus 8 \\
        --fid-reference /data/coco_val2014 --inception-path ~/inception-2015-12-05.pt
A step whose output exists is skipped (run the same command again to resume after a failure). On the toy world the
training runs go two at a time (--jobs 2), each with half the CPU cores, and evaluate.py samples in as many processes
(torchrun on the CPU; its ranks split the images): on 2 cores that is faster than one process with two threads, as the
toy models are too small to keep two threads busy (docs/study.md).
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common.runtime import require  # noqa: E402
from common.toy import PROMPT_FILES, TRAIN_PROMPTS, toy_world  # noqa: E402

ARMS = ("dpo", "dpok", "sft", "rwsft")
ARMS_BY_COST = ("dpok", "rwsft", "dpo", "sft")  # slowest first (toy, one thread each: docs/study.md)


@dataclasses.dataclass
class Args:
    mode: Literal["toy", "real"] = "toy"
    """toy: the offline toy world on a CPU; real: SD1.5 and ImageRewardDB on GPUs (the scripts' paper recipes)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """training seeds of every arm; evaluate.py treats them as units"""
    budget: Literal["full", "ci"] = "full"
    """toy only: full = the scripts' toy recipes; ci = a few steps each, to test the plumbing"""
    jobs: int | None = None
    """training runs at once, each with (CPU cores / jobs) threads, and on the toy world evaluate.py's sampling
    processes; None: 2 on the toy world, 1 in --mode real (each step there takes all --gpus)"""
    output_dir: str = "runs/study"
    """everything goes here: rm/, <arm>-s<seed>/, evaluate/, logs/, timings.json, report.md"""
    gpus: int = 1
    """real: GPUs per step (torchrun --nproc_per_node); 1 runs plain python"""
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """real: the base pipeline"""
    dataset_source: str = "THUDM/ImageRewardDB"
    """real: ImageRewardDB as a local folder (metadata-train.parquet gives DPOK's and rwsft's prompts)"""
    prompts: str = "partiprompts"
    """real: the held-out evaluation prompts (evaluate.py --prompts)"""
    fid_reference: str | None = None
    """real: FID/KID reference images for evaluate.py (None: no FID/KID)"""
    inception_path: str | None = None
    """real: clean-fid's inception-2015-12-05.pt for FID, KID and IS"""


def jobs_of(args: Args) -> int:
    """Steps at once: --jobs, or 2 on the toy world and 1 in --mode real (each step there takes all --gpus)."""
    jobs = args.jobs if args.jobs is not None else (2 if args.mode == "toy" else 1)
    require(jobs >= 1 and (args.mode == "toy" or jobs == 1),
            f"--jobs {args.jobs}: must be >= 1, and 1 in --mode real (each step takes all --gpus)")
    return jobs


def toy_training_data(out: Path) -> Path:
    """A copy of the toy ImageRewardDB whose train split keeps only TRAIN_PROMPTS' rows (the held-out prompts are
    never trained on); the other splits are linked, the image zips copied (3.7 MB: an image path that a symlink
    leads out of its data set is a broken row, common/data.py). The toy world is not touched."""
    src, dst = toy_world().imagereward, out / "imagereward_train_prompts"
    if (dst / "metadata-train.parquet").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for split in ("validation", "test"):
        (dst / f"metadata-{split}.parquet").symlink_to(src / f"metadata-{split}.parquet")
    shutil.copytree(src / "images", dst / "images")
    table = pq.read_table(src / "metadata-train.parquet")
    keep = [p in TRAIN_PROMPTS for p in table.column("prompt").to_pylist()]
    pq.write_table(table.filter(keep), dst / "metadata-train.parquet.tmp")
    (dst / "metadata-train.parquet.tmp").rename(dst / "metadata-train.parquet")
    return dst


def commands(args: Args, out: Path) -> list[tuple[str, list[str], Path]]:
    """(step name, command, the file whose presence means the step is done), in order."""
    toy, ci = args.mode == "toy", args.budget == "ci" and args.mode == "toy"
    # One process, or `procs` under torchrun (torch.distributed.run of this interpreter, so no PATH lookup): --gpus per
    # step, and on the toy world --jobs for evaluate.py, whose ranks split the images as training runs split the cores.
    run = lambda script, procs=args.gpus: ([sys.executable] if procs == 1 else [  # noqa: E731
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    ) + [str(REPO / script)]
    base = ["--toy"] if toy else []
    data = str(toy_training_data(out)) if toy else args.dataset_source
    train_prompts = str(PROMPT_FILES["train"]) if toy else f"{args.dataset_source}/metadata-train.parquet"
    rm = out / "rm"
    steps = [("reward model", run("reward_model.py") + base + [
        "--dataset", "imagereward", "--dataset-source", f"imagereward={data}", "--output-dir", str(rm),
        "--cache-dir", str(out / "embedding_cache")] + (["--steps", "5"] if ci else []), rm / "final")]
    model = [] if toy else ["--model", args.model]
    # Each toy script's own check (eval.json) at half its toy size: on the study's held-out prompts evaluate.py is
    # where the numbers come from, and the minute this saves pays for its 20 images per prompt (below).
    own_check = ["--reward-seeds", "2"] if toy and not ci else []
    for seed in args.seeds:
        s = ["--seed", str(seed)]
        arm = {
            "dpo": run("diffusion_dpo.py") + base + model + s + [
                "--dataset", "imagereward", "--dataset-source", data] + (
                ["--steps", "3", "--eval-pairs", "16", "--reward-seeds", "1"] if ci else
                own_check + (["--eval-draws", "4"] if own_check else [])),
            "dpok": run("dpok.py") + base + model + s + [
                "--scorer", "reward-model", "--scorer-path", str(rm / "final"), "--prompts", train_prompts] +
                (["--steps", "2", "--num-validation-prompts", "12"] if ci else []),
            "sft": run("sft.py") + base + model + s + [
                "--data", "preferred", "--dataset", "imagereward", "--dataset-source", data] +
                (["--steps", "3", "--reward-seeds", "1"] if ci else own_check),
            "rwsft": run("sft.py") + base + model + s + [
                "--data", "generated", "--scorer", "reward-model", "--scorer-path", str(rm / "final"), "--reg", "kl",
                "--prompts", train_prompts, "--generated-dir", str(out / "sft_generated")] +
                (["--steps", "3", "--num-images", "32", "--reward-seeds", "1"] if ci else own_check),
        }
        for name, cmd in arm.items():
            folder = out / f"{name}-s{seed}"
            steps.append((f"{name} seed {seed}", cmd + ["--output-dir", str(folder)], folder / "eval.json"))
    candidates = [f"{a}=" + ",".join(str(out / f"{a}-s{seed}") for seed in args.seeds) for a in ARMS]
    evaluate = run("evaluate.py", jobs_of(args) if toy else args.gpus) + base + [
        "--candidates", *candidates, "--summary-against", "dpo", "--output-dir", str(out / "evaluate")]
    if toy:
        evaluate += ["--scorers", "toy", "clip", "reward-model", "--scorer-paths", f"clip={toy_world().clip}",
                     f"reward-model={rm / 'final'}"]
        # 20 images per held-out prompt (evaluate.py --toy: 8): a seed's gain of ~0.015 in the true reward that sits
        # in a few images is not seen on 96 (docs/dpok.md, "On a learned reward" point 5); 20 is what the 15-minute
        # budget leaves room for (docs/study.md).
        evaluate += ["--images-per-prompt", "2", "--n-resamples", "500", "--set-resamples", "30",
                     "--rating-pairs", "4"] if ci else ["--images-per-prompt", "20"]
    else:
        evaluate += ["--model", args.model, "--prompts", args.prompts, "--scorers", "clip", "pickscore",
                     "reward-model", "--scorer-paths", f"reward-model={rm / 'final'}"]
        evaluate += ["--fid-reference", args.fid_reference] if args.fid_reference else []
        evaluate += ["--inception-path", args.inception_path] if args.inception_path else []
    steps.append(("evaluate", evaluate, out / "evaluate" / "results.json"))
    return steps


def per_run_table(results: dict, seeds: tuple[int, ...]) -> list[str]:
    """Every training run against the base on the held-out prompts, images as units: the mean of each metric, base ->
    run, with two uncorrected two-sided p over the n x k fixed-seed images (paired by prompt and seed): the paired
    t-test, whether the mean moved (dpok.py's eval.json check uses it, one-sided), and the Wilcoxon signed-rank test,
    whether most images moved. They differ where a gain sits in a few images (DPOK turning red prompts red: a mean
    gain the signed ranks barely see; docs/study.md). The summary above treats seeds as units; this asks of each seed
    alone whether it moved the model."""
    import scipy.stats

    from evaluate import wilcoxon_test

    base = results["runs"]["base"]["per_image"]
    metrics = list(base)
    lines = ["## Each run against the base on the held-out prompts (images as units, uncorrected)", "",
             f"Mean over the {results['n_prompts']} x {results['images_per_prompt']} held-out fixed-seed images, base "
             "-> run, and two two-sided p over those images paired by prompt and seed: the paired t-test (t: did the "
             "mean move?) and the Wilcoxon signed-rank test (W: did most images move?).", "",
             "| run | " + " | ".join(f"{m} base -> run (t p; W p)" for m in metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    for arm, runs in results["arms"].items():
        if arm == "base":
            continue
        for seed, run in zip(seeds if len(runs) > 1 else (None,), runs):
            cells = []
            for m in metrics:
                a, b = np.asarray(base[m]).ravel(), np.asarray(results["runs"][run]["per_image"][m]).ravel()
                t = scipy.stats.ttest_rel(b, a).pvalue if np.any(b != a) else 1.0
                cells.append(f"{a.mean():.4g} -> {b.mean():.4g} (t {t:.2g}; W {wilcoxon_test(b - a):.2g})")
            lines.append(f"| {arm}" + (f" seed {seed}" if seed is not None else "") + " | " + " | ".join(cells) + " |")
    return lines


def proxy_agreement(results: dict) -> list[str]:
    """How well the learned reward ranks what the base model draws, by the true toy reward: Spearman's ρ between the
    two over each held-out prompt's k images, averaged over prompts (toy only; DPOK climbs the learned reward, so
    where the two disagree it makes the model worse by the true one: docs/dpok.md, "On a learned reward")."""
    import scipy.stats

    base = results["runs"]["base"]["per_image"]
    if not {"toy", "reward-model"} <= set(base):
        return []
    rho = [scipy.stats.spearmanr(t, r).statistic for t, r in zip(base["toy"], base["reward-model"])]
    rho = np.asarray(rho)[np.isfinite(rho)]
    return [f"The learned reward against the true toy reward on the base model's held-out images: Spearman's ρ within "
            f"a prompt (over its {results['images_per_prompt']} images) {rho.mean():.2f} on average over "
            f"{len(rho)} prompts (lowest {rho.min():.2f}).", ""]


def report(args: Args, out: Path, steps, timings: dict) -> str:
    """report.md: the question and verdict, evaluate.py's report (its first table answers the question), each
    training run's own base-vs-final check, what ran and how long it took."""
    results = json.loads((out / "evaluate" / "results.json").read_text())
    metric = results["args"]["scorers"][0]  # toy: the true toy reward; real: CLIP score
    pair = next(c for c in results["comparisons"] if {c["a"], c["b"]} == {"dpo", "dpok"})
    cell = pair["metrics"][metric]
    win = cell["win_rate"] if pair["a"] == "dpo" else 1 - cell["win_rate"]
    p = cell["p_wilcoxon_holm"]
    verdict = (f"On {metric}, Diffusion-DPO's win rate against DPOK over the held-out prompts is {win:.0%} "
               f"({'for' if win > 0.5 else 'against'} Diffusion-DPO; Holm-adjusted Wilcoxon p = {p:.2g}): " +
               ("a significant difference at the 5 % level." if p < 0.05 else "no significant difference at the "
                "5 % level with this many prompts and seeds."))
    lines = ["# The study: Diffusion-DPO on ImageReward's comparisons vs DPOK on a reward model fitted to the same "
             "data vs SFT baselines", "",
             f"Mode {args.mode}" + (f", budget {args.budget}" if args.mode == "toy" else "") +
             f"; seeds {list(args.seeds)} per arm; evaluated on held-out prompts ({results['n_prompts']} prompts x "
             f"{results['images_per_prompt']} images, DDIM {results['sample_steps']} steps, η {results['eta']:g}).",
             "", f"**Verdict.** {verdict}", "",
             "Arms: dpo = diffusion_dpo.py on ImageRewardDB's pairs; dpok = dpok.py on the reward model fitted by "
             "reward_model.py; sft = sft.py on the preferred images; rwsft = sft.py reward-weighted on generated "
             "images with the KL regulariser.", ""]
    evaluation = (out / "evaluate" / "report.md").read_text()
    lines += [evaluation.split("\n", 1)[1].strip(), ""]  # its title is replaced by this report's
    lines += per_run_table(results, args.seeds) + [""] + proxy_agreement(results)
    lines += ["## Each training run's own check (its eval.json: the reward of fixed-seed samples, base -> final)", "",
              "The script's own test: dpok a one-sided paired t-test, the others a two-sided Wilcoxon test; each on "
              "its own validation prompts (evaluate.py's held-out prompts are in the tables above).", "",
              "| run | reward | base | final | p | warning |", "|---|---|---|---|---|---|"]
    for name, _, done in steps[1:-1]:
        e, run_args = json.loads(done.read_text()), json.loads((done.parent / "args.json").read_text())
        reward = run_args.get("scorer") or "toy"  # dpok and sft: --scorer; dpo: the toy reward
        base, final = e.get("reward_base", e.get("eval/reward_base")), e.get("reward_final", e.get("eval/reward_final"))
        p_run = e.get("p_value", e.get("eval/reward_pvalue"))
        show = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
        lines.append(f"| {name} | {reward} | {show(base)} | {show(final)} | {show(p_run)} | {e.get('warning', '')} |")
    total = sum(v for k, v in timings.items() if k != "wall clock")
    wall = f"{timings['wall clock'] / 60:.1f} min by the clock in the last invocation, " if "wall clock" in timings else ""
    lines += ["", f"## What ran, and how long it took: {wall}{total / 60:.1f} min of steps (--jobs training runs at "
              "once)", "", "| step | seconds | command |", "|---|---|---|"]
    for name, cmd, _ in steps:
        shown = " ".join(c.replace(str(REPO) + "/", "") for c in cmd[1:])
        lines.append(f"| {name} | {timings.get(name, 0):.0f} | `{shown}` |")
    return "\n".join(lines) + "\n"


def run_step(name: str, cmd: list[str], out: Path, threads: int | None) -> float:
    """Run one step, its output in logs/<name>.log; `threads` caps its OpenMP threads. Returns its seconds."""
    folder = Path(cmd[cmd.index("--output-dir") + 1])
    if folder.exists():  # a step killed half-way: start it again from nothing
        shutil.rmtree(folder)
    log = out / "logs" / f"{name.replace(' ', '_')}.log"
    env = os.environ | ({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})
    print(f"[study] {name}: {' '.join(cmd)}\n        log: {log}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    require(rc == 0, f"[study] {name} failed (exit {rc}); see {log}")
    return time.time() - t0


def main(args: Args) -> Path:
    require(len(args.seeds) >= 1 and len(set(args.seeds)) == len(args.seeds), f"--seeds {args.seeds}: distinct")
    require(args.mode == "toy" or Path(args.dataset_source).is_dir(),
            f"--dataset-source {args.dataset_source}: --mode real needs a local ImageRewardDB folder")
    jobs = jobs_of(args)
    out = Path(args.output_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = commands(args, out)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for name, _, done in steps:
        if done.exists():
            print(f"[study] {name}: done ({done} exists), skipped")
    # The reward model first (DPOK and reward-weighted SFT score with it), the evaluation last, each alone with every
    # core; the training runs in between are independent: --jobs of them at once, each with cores / jobs threads
    # (on 2 cores two 1-thread runs finish sooner than one 2-thread run after another: docs/study.md), the slowest
    # arms first so the last to start are short.
    first, training, last = ([(name, cmd) for name, cmd, done in part if not done.exists()]
                             for part in (steps[:1], steps[1:-1], steps[-1:]))
    training.sort(key=lambda step: ARMS_BY_COST.index(step[0].split()[0]))

    def record(name: str, seconds: float) -> None:
        timings[name] = seconds
        timings_file.write_text(json.dumps(timings, indent=1) + "\n")

    t_start = time.time()
    for name, cmd in first:
        record(name, run_step(name, cmd, out, None))
    threads = max(1, len(os.sched_getaffinity(0)) // jobs) if jobs > 1 else None
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        running = {pool.submit(run_step, name, cmd, out, threads): name for name, cmd in training}
        failed = []
        for future in concurrent.futures.as_completed(running):  # let the others finish, then name every failure
            try:
                record(running[future], future.result())
            except ValueError as e:
                failed.append(str(e))
    require(not failed, "\n".join(failed))
    for name, cmd in last:  # on the toy world, evaluate.py's --jobs sampling processes with cores / jobs threads
        record(name, run_step(name, cmd, out, threads))
    if first or training or last:
        record("wall clock", time.time() - t_start)
    text = report(args, out, steps, timings)
    (out / "report.md").write_text(text)
    print(text + f"\nwrote {out / 'report.md'}")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
