"""The study as one command: does Diffusion-DPO on ImageReward's comparisons match DPOK on a reward model fitted to the
same data, and how do both compare with the supervised baselines? The protocol (docs/study.md, first section) was
written before the results it reports; this file carries it out and restates it in report.md.

This file only calls the scripts, in the order a researcher would (CleanRL's benchmark/ folder does the same). One
replicate per training seed s in --seeds; the replicate is the unit of every test:

    1. reward_model.py    r_φ fitted on ImageRewardDB's train prompts with seed s                 -> rm-s<s>/final
    2. the four arms, each with seed s, on the same train prompts (their own checks on the validation prompts):
       dpo    diffusion_dpo.py --dataset imagereward                  Diffusion-DPO on the comparisons
       dpok   dpok.py --scorer reward-model --scorer-path rm-s<s>     DPOK on replicate s's fitted reward
       sft    sft.py --data preferred --dataset imagereward           SFT on the preferred images
       grpo   grpo.py --scorer reward-model --scorer-path rm-s<s>     GRPO on replicate s's fitted reward
       (--arms adds rwsft, reward-weighted SFT with the KL regulariser; draft, DRaFT-1; kto, Diffusion-KTO)
    3. evaluate.py        the base and replicate s's four models on the test prompts, every model drawing the same
                          images (evaluation seed E(s): common random numbers within a replicate, new noise across)
    4. report.md          per metric and comparison, the per-replicate differences d_s = m(A, s) - m(B, s) and the
                          paired t-test over the n replicates, Holm over every test in the report; every seed's value;
                          the training curves; each run's own check; what ran and how long it took

    d_s = m(A, s) - m(B, s),   t = mean(d) / (sd(d) / √n),   two-sided p from Student's t with n - 1 degrees of freedom
    Holm over the family of all K tests shown:  p~_(i) = max_{j <= i} min(1, (K - j + 1) p_(j))

Toy (the default): the offline toy world. Three disjoint prompt sets (common/toy.py): the arms train on
TRAIN_PROMPTS (the study's copy of the toy ImageRewardDB keeps only their rows in its train split, only
VALIDATION_PROMPTS' rows in its validation split and only TEST_PROMPTS' rows in its test split), every script's own
check and any tuning look at VALIDATION_PROMPTS, the report at TEST_PROMPTS (--eval-prompts validation evaluates on
the validation prompts instead, for tuning). --budget ci shrinks every step to seconds (tests/test_study.py). Real
(--mode real): SD1.5, ImageRewardDB (hub id or folder; --offline-dir for local copies of everything), PartiPrompts as
test prompts with every test prompt removed from the training and validation data (exact and normalised text).

Usage:
    python benchmarks/study.py                                   # toy: 5 replicates, CPU (docs/study.md: the time)
    python benchmarks/study.py --eval-prompts validation --seeds 100 101 102 103 104   # tuning: validation only
    python benchmarks/study.py --budget ci --seeds 0 1           # the reduced budget of the CI test
    python benchmarks/study.py --mode real --gpus 8 --offline-dir /data/study_offline   # real, local copies
A step whose output exists is skipped (run the same command again to resume after a failure). On the toy world the
first reward model fills the embedding cache alone; then every step starts once the steps whose output it reads are
done, --jobs at a time (default 2), each with (CPU cores / jobs) threads: the toy models are too small to keep two
threads busy, so two one-thread runs side by side nearly halve the time (docs/study.md).
"""

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import scipy.optimize
import scipy.stats
import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common.runtime import require  # noqa: E402
from common.stats import holm  # noqa: E402
from common.toy import PROMPT_FILES, TEST_PROMPTS, TRAIN_PROMPTS, VALIDATION_PROMPTS, toy_world  # noqa: E402

ARMS = ("dpo", "dpok", "sft", "grpo")  # the protocol's arms (docs/study.md, version 2); --arms may add rwsft, draft, kto
# The order in which ready steps start, the costliest first (toy, one thread each: docs/study.md): an evaluation only
# becomes ready once its replicate's arms are done, and then goes before the cheapest arm's next run.
BY_COST = ("reward model", "grpo", "dpok", "draft", "rwsft", "kto", "sft", "evaluate", "dpo")
ARM_NAMES = dict(dpo="Diffusion-DPO", dpok="DPOK", sft="SFT on the preferred images", grpo="GRPO on the fitted reward",
                 rwsft="reward-weighted SFT", draft="DRaFT-1 on the fitted reward", kto="Diffusion-KTO")
PRIMARY = ("dpo", "dpok")  # the primary comparison; its metric is the first scorer (toy: the true toy reward)
SET_METRICS = ("fid", "kid", "is")
# Real mode: what --offline-dir holds (docs/study.md lists the downloads and their sizes).
OFFLINE = dict(model="stable-diffusion-v1-5", imagereward_db="ImageRewardDB", clip="clip-vit-large-patch14",
               pickscore="PickScore_v1", pickscore_processor="CLIP-ViT-H-14-laion2B-s32B-b79K",
               imagereward="ImageReward", bert="bert-base-uncased", prompts="partiprompts.txt",
               fid_reference="coco_val2014", inception="inception-2015-12-05.pt")


@dataclasses.dataclass
class Args:
    mode: Literal["toy", "real"] = "toy"
    """toy: the offline toy world on a CPU; real: SD1.5 and ImageRewardDB on GPUs (the scripts' paper recipes)"""
    seeds: tuple[int, ...] = (30, 31, 32, 33, 34)
    """one replicate per seed (training seed of every arm and of its reward model; evaluation noise E(seed)). The
    default is protocol version 2's confirmation seeds, fresh when it was fixed (docs/study.md): tune on others, with
    --eval-prompts validation"""
    arms: tuple[Literal["dpo", "dpok", "sft", "rwsft", "grpo", "draft", "kto"], ...] = ARMS
    """the trained arms; the protocol's four by default (GRPO on replicate s's fitted reward, as DPOK). rwsft
    (sft.py, reward-weighted SFT with the KL regulariser, the first protocol's fourth arm) and draft (draft.py, DRaFT-1
    reward backpropagation) train on replicate s's fitted reward too; kto (diffusion_kto.py) on the comparisons'
    images split into liked and disliked, as Diffusion-DPO on their pairs. Another set of arms changes Holm's family,
    so a run with it is a new protocol, to be confirmed on fresh seeds"""
    eval_prompts: Literal["test", "validation"] = "test"
    """where evaluate.py scores: test (the report; touch once) or validation (tuning, recipe choice, stopping rules)"""
    images_per_prompt: int | None = None
    """images per evaluation prompt and model; None: 20 on the toy world, 2 in real mode (FID needs >= 2,048 per run)"""
    alpha: float = 0.05
    """family-wise error rate: Holm over every test the report shows"""
    budget: Literal["full", "ci"] = "full"
    """toy only: full = the scripts' toy recipes; ci = a few steps each, to test the plumbing"""
    jobs: int | None = None
    """steps at once within a phase, each with (CPU cores / jobs) threads; None: 2 on the toy world, 1 in --mode real
    (each step there takes all --gpus)"""
    output_dir: str = "runs/study"
    """everything goes here: data/, rm-s<seed>/, <arm>-s<seed>/, evaluate-s<seed>/, logs/, timings.json, report.md"""
    gpus: int = 1
    """real: GPUs per step (torchrun --nproc_per_node); 1 runs plain python"""
    offline_dir: str | None = None
    """real: a folder with local copies of every model and data set (layout: OFFLINE in this file, docs/study.md);
    None: hub ids (--model, --dataset-source) and the scripts' defaults"""
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """real: the base pipeline (hub id or folder; --offline-dir overrides)"""
    dataset_source: str = "THUDM/ImageRewardDB"
    """real: ImageRewardDB, hub id or folder (--offline-dir overrides); the study writes a filtered copy of its
    metadata (image files hard-linked where the file system allows)"""
    prompts: str = "partiprompts"
    """real: the test prompts (evaluate.py --prompts; --offline-dir overrides)"""
    fid_reference: str | None = None
    """real: FID/KID reference images for evaluate.py (None: no FID/KID; --offline-dir supplies one)"""
    inception_path: str | None = None
    """real: clean-fid's inception-2015-12-05.pt for FID, KID and IS (--offline-dir supplies one)"""


# ------------------------------------------------------------------------------------------ the statistics


def seed_level_test(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict:
    """Arm A against arm B (or the base) on one metric, the replicate as the unit. a, b: (n,) per-replicate values,
    paired by replicate (the same evaluation noise E(s), and for A vs B both trained with seed s).

        d_s = a_s - b_s,   mean = (1/n) Σ d_s,   se = sd(d) / √n  (sd with n - 1)
        t = mean / se,     p = 2 P(T_{n-1} > |t|),    interval mean ± t_{n-1, (1+confidence)/2} · se

    (scipy.stats.ttest_rel(a, b) computes the same t and p.) A d with no spread gives p = 0 if its mean is not 0,
    else 1, and a point interval."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n, mean = len(d), float(d.mean())
    require(n >= 2, f"a seed-level test needs >= 2 replicates, got {n}")
    se = float(d.std(ddof=1) / np.sqrt(n))
    if se == 0:
        p, half = (0.0 if mean != 0 else 1.0), 0.0
    else:
        p = float(2 * scipy.stats.t.sf(abs(mean / se), n - 1))
        half = float(scipy.stats.t.ppf((1 + confidence) / 2, n - 1) * se)
    return dict(n=n, mean_a=float(np.mean(a)), mean_b=float(np.mean(b)), diff=mean, ci=(mean - half, mean + half),
                sd=float(d.std(ddof=1)), p=p, a_wins=int((d > 0).sum()))


def detectable_effect(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The smallest true mean difference δ that the two-sided paired t-test over n replicates detects with the given
    power at level alpha, when the replicate differences spread by sd: the δ with

        P(|T| > t_{n-1, 1-α/2}) = power,   T ~ noncentral t(n - 1, δ √n / sd)."""
    crit = scipy.stats.t.ppf(1 - alpha / 2, n - 1)
    # the far tail P(T < -crit) is ~0 for δ > 0, and scipy's nct.cdf returns NaN there for some nc: count it as 0
    reach = lambda nc: scipy.stats.nct.sf(crit, n - 1, nc) + np.nan_to_num(  # noqa: E731
        scipy.stats.nct.cdf(-crit, n - 1, nc)) - power
    high = 1.0
    while reach(high) < 0 and high < 1e4:  # widen the bracket until the power is reached
        high *= 2
    if not reach(high) >= 0:  # n too small for this alpha (or nct out of its range): nothing is detectable
        return float("inf")
    return float(scipy.optimize.brentq(reach, 0.0, high) * sd / np.sqrt(n))


# ------------------------------------------------------------------------------------------ prompt sets and data


def normalise(prompt: str) -> str:
    """For the leak check: Unicode NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", prompt).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def check_disjoint(sets: dict[str, list[str]]) -> None:
    """Raise, naming the prompt and both sets, if any two prompt sets share a prompt (exact or normalised text)."""
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = {normalise(p) for p in sets[a]} & {normalise(p) for p in sets[b]}
            if shared:
                raise ValueError(f"prompt sets {a} and {b} share {len(shared)} prompt(s) (exact or normalised "
                                 f"text), e.g. {sorted(shared)[0]!r}")


def filtered_imagereward(src: Path, dst: Path, keep: dict[str, list[str] | None], drop: list[str]) -> dict:
    """A copy of ImageRewardDB's metadata whose split `name` keeps only the rows whose prompt is in keep[name] (None:
    every row) and not in `drop` (normalised text); nothing in src changes. The image files are hard-linked (copied
    where src is on another file system): a symlink would lead out of the data set, which the loaders refuse
    (common/data.py). Returns {split: (rows read, rows kept, prompts kept)}; the kept prompts go to
    dst/prompts-<split>.txt."""
    counts, dropped = {}, {normalise(p) for p in drop}
    dst.mkdir(parents=True, exist_ok=True)
    for file in sorted((src / "images").resolve().rglob("*")):
        target = dst / "images" / file.relative_to((src / "images").resolve())
        if file.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, target)
            except OSError:  # another file system (or no hard links there): copy
                shutil.copy2(file, target)
    for split, prompts in keep.items():
        table = pq.read_table(src / f"metadata-{split}.parquet")
        wanted = None if prompts is None else set(prompts)
        rows = [(wanted is None or p in wanted) and normalise(p) not in dropped
                for p in table.column("prompt").to_pylist()]
        kept = table.filter(rows)
        tmp = dst / f"metadata-{split}.parquet.tmp"
        pq.write_table(kept, tmp)
        tmp.rename(dst / f"metadata-{split}.parquet")
        names = list(dict.fromkeys(kept.column("prompt").to_pylist()))
        (dst / f"prompts-{split}.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in names))
        counts[split] = (table.num_rows, kept.num_rows, len(names))
    return counts


def local_imagereward(source: str) -> Path:
    """ImageRewardDB as a folder: itself, or the hub snapshot the scripts would download anyway (metadata of every
    split, the images of train and validation, the splits the arms read)."""
    if Path(source).is_dir():
        return Path(source)
    import huggingface_hub

    patterns = [f"metadata-{s}.parquet" for s in ("train", "validation", "test")] + ["images/train/*",
                                                                                       "images/validation/*"]
    return Path(huggingface_hub.snapshot_download(source, repo_type="dataset", allow_patterns=patterns))


def prepare_data(args: Args, out: Path) -> dict:
    """The three prompt sets and the filtered data every arm and metric reads; checks they are disjoint."""
    data = out / "data"
    if args.mode == "toy":
        src = toy_world().imagereward
        sets = dict(train=TRAIN_PROMPTS, validation=VALIDATION_PROMPTS, test=TEST_PROMPTS)
        counts = filtered_imagereward(src, data / "imagereward", dict(sets), drop=[])
    else:
        src = local_imagereward(paths_of(args)["dataset_source"])
        from common.data import load_prompts

        test = load_prompts(paths_of(args)["prompts"])
        # train and validation lose every test prompt; validation also every train prompt
        counts = filtered_imagereward(src, data / "imagereward", dict(train=None), drop=test)
        train = (data / "imagereward" / "prompts-train.txt").read_text().splitlines()
        counts |= filtered_imagereward(src, data / "imagereward", dict(validation=None), drop=test + train)
        sets = dict(train=train, validation=(data / "imagereward" / "prompts-validation.txt").read_text().splitlines(),
                    test=test)
    check_disjoint(sets)
    empty = [name for name, prompts in sets.items() if not prompts]
    require(not empty, f"prompt sets {empty} are empty after removing the test prompts (and, from validation, the "
            f"train prompts): {data / 'imagereward'}")
    files = {}
    for name, prompts in sets.items():
        files[name] = data / f"prompts-{name}.txt"
        files[name].write_text("".join(p + "\n" for p in prompts))
    return dict(imagereward=data / "imagereward", prompt_files=files, counts=counts,
                sizes={k: len(v) for k, v in sets.items()})


def paths_of(args: Args) -> dict[str, str | None]:
    """Real mode: where each model and data set comes from, --offline-dir's copies when given."""
    d = Path(args.offline_dir) if args.offline_dir else None
    at = lambda key: str(d / OFFLINE[key]) if d else None  # noqa: E731
    return dict(model=at("model") or args.model, dataset_source=at("imagereward_db") or args.dataset_source,
                prompts=at("prompts") or args.prompts, clip=at("clip"), pickscore=at("pickscore"),
                pickscore_processor=at("pickscore_processor"), imagereward=at("imagereward"), bert=at("bert"),
                fid_reference=at("fid_reference") or args.fid_reference,
                inception=at("inception") or args.inception_path)


# ------------------------------------------------------------------------------------------ the steps


def evaluation_seed(seed: int) -> int:
    """E(s): evaluate.py draws image j of prompt i with E(s) + i + 100000 j, so replicates 10^8 apart never share
    noise (up to 10^5 prompts and 10^3 images per prompt), and every model of a replicate shares it."""
    return (seed + 1) * 100_000_000


def commands(args: Args, out: Path, data: dict) -> list[tuple[str, str, list[str], Path]]:
    """(phase, step name, command, the file whose presence means the step is done), in order of phases."""
    toy, ci = args.mode == "toy", args.budget == "ci" and args.mode == "toy"
    src = paths_of(args) if not toy else {}
    # One process, or `procs` under torchrun (torch.distributed.run of this interpreter, so no PATH lookup).
    run = lambda script: ([sys.executable] if args.gpus == 1 or toy else [  # noqa: E731
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    ) + [str(REPO / script)]
    base = ["--toy"] if toy else ["--model", src["model"]]
    ir, files = str(data["imagereward"]), data["prompt_files"]
    clip = ["--clip-path", src["clip"]] if src.get("clip") else []
    # Each toy script's own check (eval.json) at half its toy size, on the validation prompts (DPOK's at its own: its
    # reward unit comes from it): evaluate.py on the test prompts is where the study's numbers come from.
    own = (["--reward-seeds", "2"] if toy and not ci else []) + ["--validation-prompts", str(files["validation"])]
    steps = []
    for seed in args.seeds:
        s, rm = ["--seed", str(seed)], out / f"rm-s{seed}"
        steps.append(("reward models", f"reward model seed {seed}", run("reward_model.py") + (["--toy"] if toy else [])
                      + s + clip + ["--dataset", "imagereward", "--dataset-source", f"imagereward={ir}",
                                    "--imagereward-eval-split", "validation", "--output-dir", str(rm),
                                    "--cache-dir", str(out / "embedding_cache")] + (["--steps", "5"] if ci else []),
                      rm / "final"))
    for seed in args.seeds:
        s, rm = ["--seed", str(seed)], out / f"rm-s{seed}" / "final"
        learned = ["--scorer", "reward-model", "--scorer-path", str(rm)] + clip
        on_learned_reward = lambda script: run(script) + base + s + learned + [  # noqa: E731
            "--prompts", str(files["train"]), "--validation-prompts", str(files["validation"])] + (
            ["--steps", "2", "--num-validation-prompts", "6", "--sample-every", "2", "--checkpoint-every", "2"]
            if ci else [])
        arm = {
            "dpo": run("diffusion_dpo.py") + base + s + own + ["--dataset", "imagereward", "--dataset-source", ir] + (
                ["--steps", "3", "--eval-pairs", "16", "--reward-seeds", "1"] if ci else
                ["--eval-draws", "4"] if toy else []),
            "dpok": run("dpok.py") + base + s + learned + ["--prompts", str(files["train"]), "--validation-prompts",
                                                           str(files["validation"])] +
                    (["--steps", "2", "--num-validation-prompts", "6"] if ci else []),
            "sft": run("sft.py") + base + s + own + ["--data", "preferred", "--dataset", "imagereward",
                                                     "--dataset-source", ir] +
                   (["--steps", "3", "--reward-seeds", "1"] if ci else []),
            "rwsft": run("sft.py") + base + s + own + learned + [
                "--data", "generated", "--reg", "kl", "--prompts", str(files["train"]),
                "--generated-dir", str(out / f"sft_generated-s{seed}")] +
                (["--steps", "3", "--num-images", "32", "--reward-seeds", "1"] if ci else []),
            # GRPO (a protocol arm since version 2) and DRaFT-1 on replicate s's fitted reward as DPOK, KTO on DPO's
            # data (rwsft, above, draft and kto: extra arms, --arms)
            "grpo": on_learned_reward("grpo.py") + (["--num-validation-prompts", "24"] if toy and not ci else []),
            "draft": on_learned_reward("draft.py"),
            "kto": run("diffusion_kto.py") + base + s + own + ["--dataset", "imagereward", "--dataset-source", ir] + (
                ["--steps", "3", "--eval-images", "16", "--reward-seeds", "1"] if ci else
                ["--eval-draws", "4"] if toy else []),
        }
        for name, cmd in ((a, arm[a]) for a in args.arms):
            folder = out / f"{name}-s{seed}"
            steps.append(("training", f"{name} seed {seed}", cmd + ["--output-dir", str(folder)],
                          folder / "eval.json"))
    k = args.images_per_prompt or (2 if ci else 20 if toy else 2)
    for i, seed in enumerate(args.seeds):
        folder = out / f"evaluate-s{seed}"
        cmd = run("evaluate.py") + base + [
            "--candidates", *[f"{a}={out / f'{a}-s{seed}'}" for a in args.arms], "--seed", str(evaluation_seed(seed)),
            "--prompts", str(files[args.eval_prompts]), "--images-per-prompt", str(k), "--output-dir", str(folder),
            # the double-blind rating kit once, from the first replicate's images (docs/rating_kit.md)
            "--rating-pairs", str((4 if ci else 12 if toy else 50) if i == 0 else 0)]
        rm = str(out / f"rm-s{seed}" / "final")
        if toy:
            cmd += ["--scorers", "toy", "clip", "reward-model", "--scorer-paths", f"clip={toy_world().clip}",
                    f"reward-model={rm}"] + (["--n-resamples", "500", "--set-resamples", "30"] if ci else
                                             ["--set-resamples", "50"])
        else:
            weights = {"reward-model": rm, "imagereward": src["imagereward"], "pickscore": src["pickscore"],
                       "clip": src["clip"]}
            procs = {"imagereward": src["bert"], "pickscore": src["pickscore_processor"]}
            cmd += ["--scorers", "imagereward", "pickscore", "clip", "reward-model", "--scorer-paths",
                    *[f"{k}={v}" for k, v in weights.items() if v]]  # each list flag once: tyro does not append
            cmd += ["--clip-paths", *[f"{k}={v}" for k, v in procs.items() if v]] if any(procs.values()) else []
            cmd += ["--fid-reference", src["fid_reference"]] if src["fid_reference"] else []
            cmd += ["--inception-path", src["inception"]] if src["inception"] else []
        steps.append(("evaluation", f"evaluate seed {seed}", cmd, folder / "results.json"))
    return steps


# ------------------------------------------------------------------------------------------ the report


def replicate_values(out: Path, seeds: tuple[int, ...], arms: tuple[str, ...]) -> tuple[dict, list[str]]:
    """values[model][metric] = (n,) per-replicate values on the evaluation prompts: the mean over prompts x images of
    each per-image scorer, and FID / KID / IS of the run's images; model in base + arms."""
    values, metrics = {}, []
    for seed in seeds:
        res = json.loads((out / f"evaluate-s{seed}" / "results.json").read_text())
        metrics = list(res["args"]["scorers"]) + [m for m in SET_METRICS if m in res["runs"]["base"]]
        for model in ("base",) + tuple(arms):
            run = res["runs"][res["arms"][model][0]]
            for m in metrics:
                v = float(np.mean(run["per_image"][m])) if m in run["per_image"] else float(run[m])
                values.setdefault(model, {}).setdefault(m, []).append(v)
    return {a: {m: np.array(v) for m, v in ms.items()} for a, ms in values.items()}, metrics


def seed_tests(values: dict, metrics: list[str], alpha: float) -> list[dict]:
    """Every comparison (each arm against the base, the arms pairwise; the primary first) x every metric, the
    seed-level test of each, Holm across all of them: the report's whole family of tests."""
    arms = [a for a in values if a != "base"]
    pairs = [PRIMARY] + [(a, "base") for a in arms] + [
        (a, b) for i, a in enumerate(arms) for b in arms[i + 1:] if (a, b) != PRIMARY]
    tests = [dict(a=a, b=b, metric=m, **seed_level_test(values[a][m], values[b][m])) for a, b in pairs for m in metrics]
    for t, p in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"], t["significant"] = p, p <= alpha
    return tests


def verdict(tests: list[dict], metric: str, alpha: float, prompts: str = "test") -> str:
    """The sentence the primary test supports, and no more. prompts: the set evaluate.py scored (--eval-prompts)."""
    t = next(t for t in tests if (t["a"], t["b"], t["metric"]) == PRIMARY + (metric,))
    head = (f"On the primary endpoint ({metric} on the {prompts} prompts), Diffusion-DPO minus DPOK is {t['diff']:+.4g} "
            f"[{t['ci'][0]:.4g}, {t['ci'][1]:.4g}] over {t['n']} replicates (Diffusion-DPO ahead in {t['a_wins']} of "
            f"{t['n']}; paired t-test p = {t['p']:.2g}, Holm-adjusted {t['p_holm']:.2g}): ")
    if not t["significant"]:
        return head + f"no significant difference at α = {alpha:g} after Holm; the design cannot tell them apart."
    return head + f"{'Diffusion-DPO' if t['diff'] > 0 else 'DPOK'} is ahead at α = {alpha:g} after Holm."


def fmt(x: float) -> str:
    return f"{x:.4g}"


def training_curves(out: Path, seeds: tuple[int, ...], arms: tuple[str, ...] = ARMS) -> Path | None:
    """training_curves.png: per arm, its reward-like and its KL- or loss-like metric per logged step, one line per
    seed (so that a seed that collapses is seen, not averaged away)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("dpo", "rewards/margin", "implicit reward margin"), ("dpo", "losses/loss", "DPO loss"),
              ("dpok", "rewards/mean", "learned reward of its samples"), ("dpok", "losses/kl", "KL term"),
              ("sft", "losses/loss", "loss"), ("rwsft", "losses/reg", "KL regulariser"),
              ("grpo", "rewards/mean", "learned reward of its samples"), ("grpo", "charts/clip_frac", "clip fraction"),
              ("draft", "rewards/mean", "learned reward of its samples"), ("draft", "losses/loss", "loss"),
              ("kto", "losses/loss", "KTO loss"), ("kto", "rewards/reference_point", "reference point z_0")]
    shown = [a for a in dict.fromkeys(p[0] for p in panels) if a in arms]  # one column per arm, its panels below
    fig, axes = plt.subplots(2, len(shown), figsize=(4.4 * len(shown), 6.5), squeeze=False)
    place = {}
    for arm, metric, label in panels:
        if arm in shown:
            col = shown.index(arm)
            place[(arm, metric, label)] = axes[sum(1 for k in place if k[0] == arm), col]
    for ax in set(axes.ravel()) - set(place.values()):
        ax.axis("off")
    for (arm, metric, label), ax in place.items():
        for seed in seeds:
            log = out / f"{arm}-s{seed}" / "metrics.jsonl"
            rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            xs = [r["step"] for r in rows if metric in r]
            ax.plot(xs, [r[metric] for r in rows if metric in r], label=f"seed {seed}", lw=1.2, marker=".", ms=3)
        ax.set_title(f"{arm}: {label}", fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(args: Args, out: Path, data: dict, steps, timings: dict) -> tuple[str, list[dict]]:
    """report.md: the protocol restated, the verdict, the seed-level table, every seed's value, the curves, each
    run's own check, the data filtering, what ran and how long it took."""
    values, metrics = replicate_values(out, args.seeds, args.arms)
    tests = seed_tests(values, metrics, args.alpha)
    n, first = len(args.seeds), metrics[0]
    first_eval = json.loads((out / f"evaluate-s{args.seeds[0]}" / "results.json").read_text())
    base_sd = {m: float(np.std(values["base"][m], ddof=1)) if n > 1 else float("nan") for m in metrics}
    rest = [ARM_NAMES[a] for a in args.arms if a not in PRIMARY]
    others = " and ".join([", ".join(rest[:-1]), rest[-1]] if len(rest) > 1 else rest) or "nothing else"
    lines = ["# The study: Diffusion-DPO on ImageReward's comparisons vs DPOK on a reward model fitted to the same "
             f"data, with {others}", "",
             "## The protocol (docs/study.md, fixed before the results)", "",
             f"- Question: does Diffusion-DPO match DPOK (the primary comparison), and how do both, {others}, "
             f"compare with the base and each other (the secondary ones)?",
             f"- Unit: the replicate, one per training seed ({n}: {list(args.seeds)}); each refits the reward model "
             f"with its seed and trains every arm with it; evaluation noise is shared by the models of a replicate "
             f"and new in each replicate.",
             f"- Primary endpoint: {first} on the {args.eval_prompts} prompts ({first_eval['n_prompts']} prompts x "
             f"{first_eval['images_per_prompt']} images per model, DDIM {first_eval['sample_steps']} steps, "
             f"η {first_eval['eta']:g}), the mean per replicate.",
             f"- Test: the paired t-test over replicates of d_s = m(A, s) - m(B, s), two-sided; Holm over all "
             f"{len(tests)} tests below ({len(tests) // len(metrics)} comparisons x {len(metrics)} metrics, FID/KID/IS "
             f"included) at α = {args.alpha:g}. Image-level numbers are descriptive only.", ""]
    if args.eval_prompts != "test":
        lines += ["**Evaluated on the validation prompts (tuning), not the test prompts: not a result.**", ""]
    lines += [f"**Verdict.** {verdict(tests, first, args.alpha, args.eval_prompts)}", "",
              f"## 1. Seed-level tests (Holm-adjusted over all {len(tests)})", "",
              "Mean over replicates of A and B, the mean difference with its 95 % t-interval, in how many replicates "
              "A was ahead, the paired t-test p, Holm's p, and the smallest difference this many replicates detect "
              f"with 80 % power at α/{len(tests)} (Holm's first step) given the observed spread of d.", "",
              "| A vs B | metric | A | B | A - B [95 % CI] | A ahead | p | Holm p | detectable at α/K |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        mde = detectable_effect(t["sd"], n, args.alpha / len(tests)) if n > 1 and t["sd"] > 0 else float("nan")
        star = " **" if t["significant"] else " "
        lines.append(f"| {t['a']} vs {t['b']} | {t['metric']} | {fmt(t['mean_a'])} | {fmt(t['mean_b'])} | "
                     f"{t['diff']:+.4g} [{fmt(t['ci'][0])}, {fmt(t['ci'][1])}] | {t['a_wins']}/{t['n']} | "
                     f"{t['p']:.2g} |{star}{t['p_holm']:.2g}{star.strip()} | {fmt(mde)} |")
    lines += ["", "## 2. Every replicate's value", "",
              f"Each model's mean on the {args.eval_prompts} prompts per replicate (seed), and in how many replicates "
              "each arm beat that replicate's base (lower is better for FID and KID). The base differs between "
              "replicates only by the evaluation noise: its spread is what a model that does not change would show "
              f"({', '.join(f'{m} sd {base_sd[m]:.2g}' for m in metrics)}).", "",
              "| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lower_better = {"fid", "kid"}
    for model in ("base",) + tuple(args.arms):
        cells = []
        for m in metrics:
            v = values[model][m]
            beat = "" if model == "base" else (
                f"; beats base {int(((v < values['base'][m]) if m in lower_better else (v > values['base'][m])).sum())}"
                f"/{n}")
            cells.append(" / ".join(fmt(x) for x in v) + f" (mean {fmt(v.mean())}{beat})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    curves = training_curves(out, args.seeds, args.arms)
    lines += ["", "## 3. Training curves, one line per seed", "", f"![training curves]({curves.name})", ""]
    lines += evaluation_noise(values, metrics, first_eval["images_per_prompt"])
    lines += own_checks(steps)
    lines += ["## 6. Prompt sets and data", "",
              "Prompts per set: " + ", ".join(f"{k} {v}" for k, v in data["sizes"].items()) +
              " (no prompt in two sets, exact or normalised text). ImageRewardDB rows kept per split of the study's "
              "copy (read, kept, prompts): " + "; ".join(f"{k} {v[0]} -> {v[1]} rows, {v[2]} prompts"
                                                         for k, v in data["counts"].items()) + ".", ""]
    lines += [f"The double-blind rating kit (human evaluation): send `evaluate-s{args.seeds[0]}/rating_kit/` to the "
              f"raters and keep its key, `evaluate-s{args.seeds[0]}/rating_key.json` (docs/rating_kit.md).", ""]
    total = sum(v for k, v in timings.items() if k != "wall clock")
    wall = f"{timings['wall clock'] / 60:.1f} min by the clock in the last invocation, " if "wall clock" in timings else ""
    lines += [f"## 7. What ran, and how long it took: {wall}{total / 60:.1f} min of steps (--jobs steps at once)", "",
              "| step | seconds | command |", "|---|---|---|"]
    for _, name, cmd, _ in steps:
        shown = " ".join(c.replace(str(REPO) + "/", "").replace(str(out) + "/", "") for c in cmd[1:])
        lines.append(f"| {name} | {timings.get(name, 0):.0f} | `{shown}` |")
    return "\n".join(lines) + "\n", tests


def evaluation_noise(values: dict, metrics: list[str], k: int) -> list[str]:
    """Descriptive: the base is the same model in every replicate, so the spread of its per-replicate means is the
    evaluation noise alone (at k images per prompt); an arm's spread of d_s = m(arm, s) - m(base, s) adds what its
    training seed changes, less the noise the common random numbers cancel."""
    sd = lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")  # noqa: E731
    arms = [a for a in values if a != "base"]
    lines = ["## 4. Descriptive: evaluation noise against the spread between training seeds", "",
             f"Standard deviations over replicates: the base's per-replicate mean (evaluation noise alone, {k} images "
             "per prompt), and each arm's difference from its replicate's base (training seed and noise).", "",
             "| metric | base (noise) | " + " | ".join(f"{a} - base" for a in arms) + " |",
             "|---" * (len(arms) + 2) + "|"]
    for m in metrics:
        lines.append(f"| {m} | {sd(values['base'][m]):.2g} | " +
                     " | ".join(f"{sd(values[a][m] - values['base'][m]):.2g}" for a in arms) + " |")
    return lines + [""]


def own_checks(steps) -> list[str]:
    """Each training run's eval.json: its own base-vs-final check on the validation prompts (descriptive here)."""
    lines = ["## 5. Each training run's own check, on the validation prompts (descriptive)", "",
             "Its eval.json: the reward of fixed-seed samples, base -> final, and the script's own p (dpok: one-sided "
             "paired t-test; the others: two-sided Wilcoxon; images as units, so not evidence here).", "",
             "| run | reward | base | final | p | warning |", "|---|---|---|---|---|---|"]
    show = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
    for phase, name, _, done in steps:
        if phase != "training":
            continue
        e, run_args = json.loads(done.read_text()), json.loads((done.parent / "args.json").read_text())
        base, final = e.get("reward_base", e.get("eval/reward_base")), e.get("reward_final", e.get("eval/reward_final"))
        lines.append(f"| {name} | {run_args.get('scorer') or 'toy'} | {show(base)} | {show(final)} | "
                     f"{show(e.get('p_value', e.get('eval/reward_pvalue')))} | {e.get('warning', '')} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------ running it


def prerequisites(steps: list) -> dict[str, set[str]]:
    """For each step, the steps it waits for: those whose --output-dir its command reads (an arm on the fitted reward
    reads its replicate's reward model, an evaluation every model of its replicate), and, for each reward model after
    the first, the first (it fills the embedding cache the others read)."""
    outputs, inputs = {}, {}  # a step's --output-dir; every other path its command names (the parts of k=v too)
    for _, name, cmd, _ in steps:
        i = cmd.index("--output-dir")
        outputs[name] = cmd[i + 1]
        inputs[name] = [part for arg in cmd[:i] + cmd[i + 2:] for part in arg.split("=")]
    reads = lambda name, path: any(p == path or p.startswith(path + os.sep) for p in inputs[name])  # noqa: E731
    needs = {name: {other for other, path in outputs.items() if other != name and reads(name, path)}
             for name in outputs}
    models = [name for phase, name, _, _ in steps if phase == "reward models"]
    for name in models[1:]:
        needs[name].add(models[0])
    return needs


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
    require(len(args.seeds) >= 2 and len(set(args.seeds)) == len(args.seeds),
            f"--seeds {args.seeds}: at least 2 distinct seeds (the replicate is the unit of every test)")
    require(args.images_per_prompt is None or args.images_per_prompt >= 1, "--images-per-prompt must be >= 1")
    require(0 < args.alpha < 1, f"--alpha {args.alpha}: must be in (0, 1)")
    jobs = args.jobs if args.jobs is not None else (2 if args.mode == "toy" else 1)
    require(jobs >= 1 and (args.mode == "toy" or jobs == 1),
            f"--jobs {args.jobs}: must be >= 1, and 1 in --mode real (each step takes all --gpus)")
    out = Path(args.output_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)
    steps = commands(args, out, data)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for _, name, _, done in steps:
        if done.exists():
            print(f"[study] {name}: done ({done} exists), skipped")

    def record(name: str, seconds: float) -> None:
        timings[name] = seconds
        timings_file.write_text(json.dumps(timings, indent=1) + "\n")

    # The first reward model fills the embedding cache alone, with every core. Then every other step starts as soon as
    # the steps whose output it reads are done, --jobs at once with cores / jobs threads each, the costliest ready step
    # first: no core waits for a phase to end. Each step's thread count is fixed by this rule, never by timing.
    threads = max(1, len(os.sched_getaffinity(0)) // jobs) if jobs > 1 else None
    needs = prerequisites(steps)
    names = [name for _, name, _, _ in steps]
    kind = lambda name: name.rsplit(" seed ", 1)[0]  # noqa: E731
    rank = lambda name: (BY_COST.index(kind(name)) if kind(name) in BY_COST else len(BY_COST), names.index(name))  # noqa: E731
    first = [step for step in steps if step[0] == "reward models"][:1]
    finished = {name for _, name, _, done in steps if done.exists()}
    t_start, ran = time.time(), False
    for batch, width in ((first, 1), ([step for step in steps if step not in first], jobs)):
        todo = {name: cmd for _, name, cmd, done in batch if not done.exists()}
        ran |= bool(todo)
        running, failed = {}, []
        with concurrent.futures.ThreadPoolExecutor(width) as pool:
            while todo or running:
                for name in sorted((n for n in todo if needs[n] <= finished), key=rank)[:width - len(running)]:
                    running[pool.submit(run_step, name, todo.pop(name), out, threads if width > 1 else None)] = name
                if not running:
                    break  # what is left waits for a step that failed
                ended, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in ended:  # a failure lets the others go on; the study stops at the end, naming it
                    name = running.pop(future)
                    try:
                        record(name, future.result())
                        finished.add(name)
                    except ValueError as e:
                        failed.append(str(e))
        require(not failed, "\n".join(failed + [f"[study] not run (they read a failed step's output): "
                                                f"{', '.join(todo)}"] * bool(todo)))
    if ran:
        record("wall clock", time.time() - t_start)
    text, tests = report(args, out, data, steps, timings)
    (out / "report.md").write_text(text)
    (out / "tests.json").write_text(json.dumps(tests, indent=1) + "\n")
    print(text + f"\nwrote {out / 'report.md'}, {out / 'tests.json'}, {out / 'training_curves.png'}")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
