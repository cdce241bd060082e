"""Evaluate text-to-image models against a baseline: paired samples, scores, and honest statistics.

Docs (usage, logged metrics, implementation details with sources, toy results, tests): docs/evaluate.md

Every model draws the same images: prompt i, image j uses seed `seed + i + 100000 j`, so the baseline's and a
candidate's image j of prompt i share their initial noise and differ only by the model. The prompt is the unit of
analysis (Diffusion-DPO, DPOK and Pick-a-Pic report win rates over prompts, mostly without intervals):

    s_i^A = (1/k) sum_j r(x_ij^A, c_i)          mean score of model A's k images of prompt c_i, for a scorer r
    d_i = s_i^A - s_i^B                          paired difference, i = 1..n prompts
    Delta = (1/n) sum_i d_i                      mean difference, with a BCa bootstrap interval over prompts
    W = (1/n) sum_i (1[d_i > 0] + 1/2 1[d_i = 0])    win rate of A over B (ties count 1/2), BCa interval
    sign test:  #{d_i > 0} ~ Binomial(#{d_i != 0}, 1/2) under H0;   Wilcoxon signed-rank test of the d_i
    Holm:       p~_(m') = max_{j <= m'} min(1, (M - j + 1) p_(j))  over ALL M = comparisons x metrics of the report

(common/stats.py computes them, for this report and for rating_kit.py's human ratings alike.)

A model trained with several seeds is given as NAME=RUN_A,RUN_B,RUN_C: each run samples the same images, its score
is the mean over runs, and its intervals resample the seeds as well as the prompts (seeds_comparison), so a method
whose seeds disagree gets a wide interval. The toy default evaluates on held-out prompts the study never trains on.

Scorers r (common/scorers.py): CLIP score 100 max(cos, 0) per image (Hessel et al.'s clamp; `clip-raw` gives
torchmetrics' unclamped 100 cos), PickScore, HPS v2.1 (100 cos), ImageReward, LAION aesthetic, a reward model trained
by reward_model.py, the toy reward. Set metrics, one number per model (no per-prompt pairing, compared only at equal
sample counts): FID = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)) and KID (unbiased MMD^2, cubic kernel)
on Inception pool features against a reference set, and Inception Score exp(E_x KL(p(y|x) || p(y))), all with
clean-fid's functions on clean-fid's TorchScript Inception (https://github.com/GaParmar/clean-fid), each with a
bootstrap interval over the images; the report warns when a sample is too small (FID below 2,048 images) or counts
differ. Every model samples with DDIM (--sample-steps, --eta), the training scripts' toy evaluations likewise.

A double-blind human rating kit (rating_kit.py; docs/rating_kit.md) is written next to the scores:
rating_kit/page_NN.html, one per comparison, each pair asked per criterion (visual appeal with the prompt hidden,
prompt alignment, overall preference), with attention-check pairs, and rating_key.json beside that folder (never in
it: the folder goes to the raters, the key stays with you). --ingest-ratings turns the raters' files into win rates
per criterion and comparison with the same intervals and tests, Holm across them, and Fleiss' kappa per criterion.

Usage:
    python evaluate.py --candidates dpo=runs/diffusion_dpo-XXXX sft=runs/sft-XXXX/final/lora \
        --prompts partiprompts --fid-reference coco_val2014/ --inception-path ~/inception-2015-12-05.pt
    torchrun --nproc_per_node 8 evaluate.py --candidates dpo=runs/diffusion_dpo-XXXX   # sampling split over GPUs
    python evaluate.py --candidates dpo=runs/diffusion_dpo-XXXX --prompts pickapic \
        --scorers pickscore hps aesthetic clip imagereward --scorer-paths aesthetic=sac+logos+ava1-l14-linearMSE.pth
    python evaluate.py --ingest-ratings alice.json bob.json --rating-key runs/evaluate-XXXX/rating_key.json
    python evaluate.py --candidates dpo=runs/dpo-s0,runs/dpo-s1,runs/dpo-s2 dpok=runs/dpok-s0,runs/dpok-s1 ...
    python evaluate.py --toy            # the toy base against a toy diffusion_dpo.py run (trained first if missing)
"""

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import numpy as np
import pyarrow.parquet as pq
import torch
import tyro
from PIL import Image
from tqdm import tqdm

from common.data import decode_image, load_prompts
from common.runtime import (barrier, cleanup_distributed, fingerprint, require, save_image_grid, setup_distributed,
                            write_args)
from common.scorers import ScorerName, load_scorer
# The paired statistics live in common/stats.py, shared with rating_kit.py; the names are imported here too, so
# `from evaluate import wilcoxon_test` (benchmarks/study.py, the tests) keeps working.
from common.stats import (bca_interval, compare, fmt, holm, holm_across, paired_comparison,  # noqa: F401
                          seeds_comparison, sign_test, wilcoxon_test)
from common.toy import PROMPT_FILES
from common.toy import PROMPTS as TOY_PROMPTS
from common.toy import toy_model_in, toy_sdxl_pipeline, toy_world
import rating_kit  # the human rating kit (export and ingest); it imports common/stats.py, not this file

REPO = Path(__file__).resolve().parent
# toy, clip, clip-raw, pickscore, hps, imagereward, aesthetic, reward-model: see common/scorers.py
Criterion = Literal["appeal", "alignment", "overall"]  # the rating kit's questions: rating_kit.QUESTIONS


@dataclass
class Args:
    # ---- the models
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """pipeline (hub id or folder): the model named "base", and the pipeline UNet/LoRA candidates are loaded into"""
    candidates: tuple[str, ...] = ()
    """NAME=PATH or NAME=PATH1,PATH2,.. (one model trained with several seeds: the seed becomes a unit of the
    statistics), PATH one of (checked in this order): a run's output dir (its final/unet or final/lora), a UNet
    folder, a LoRA folder, a pipeline folder or hub id. Toy, none given: a toy diffusion_dpo.py run (trained first)"""
    baseline: str = "base"
    """the model every other one is compared with: "base" or a candidate's NAME; candidates also meet pairwise"""
    # ---- prompts and sampling
    prompts: str = "partiprompts"
    """a text file, .json list, parquet (caption/prompt column), HPSv2 folder, "partiprompts" (1,632) or "pickapic"
    (500 validation_unique captions): common/data.py load_prompts"""
    max_prompts: int | None = None
    """keep the first N prompts only"""
    images_per_prompt: int = 1
    """k images per prompt, averaged per prompt before any statistic"""
    seed: int = 0
    """image j of prompt i is drawn with seed + i + 100000 j, for every model"""
    sample_steps: int = 50
    """DDIM steps (every model samples with DDIMScheduler on its own config, so --eta means the same everywhere)"""
    eta: float = 0.0
    """η of DDIM: 0 deterministic (diffusers' default), 1 DDPM-like; the training scripts' toy evaluations use the
    toy study's values (20 steps, η = 0)"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight (diffusers' SD1.5 default)"""
    resolution: int | None = None
    """image side in pixels; None: the pipeline's default (512 for SD1.5)"""
    per_device_batch: int = 16
    """images per pipeline call and per scorer call, per GPU"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """dtype of the weights for sampling (inference needs no fp32 master copy); "no" on a CPU"""
    # ---- metrics
    scorers: tuple[ScorerName, ...] = ("clip", "pickscore")
    """per-image scorers (common/scorers.py); aesthetic and reward-model need --scorer-paths. Diffusion-DPO's table:
    pickscore hps aesthetic clip imagereward; DPOK's: imagereward"""
    scorer_paths: tuple[str, ...] = ()
    """NAME=PATH: a scorer's weights when not its default hub id, e.g. aesthetic=sac+logos+ava1-l14-linearMSE.pth
    reward-model=runs/reward_model-XXXX/final; merged with the defaults (--toy: the toy world's CLIP for clip)"""
    clip_paths: tuple[str, ...] = ()
    """NAME=PATH: a scorer's processor (clip, clip-raw, pickscore, hps), backbone (aesthetic, reward-model) or BERT
    tokenizer (imagereward), if not its default"""
    fid_reference: str | None = None
    """FID/KID reference: an image folder, a parquet with an `image` column, or an .npz of mu, sigma (and feats, for
    KID) such as the reference_stats.npz this script writes. None: no FID/KID"""
    inception_path: str | None = None
    """local inception-2015-12-05.pt (clean-fid's TorchScript Inception) for FID, KID and IS; None: skip them (we
    never download it). The toy uses a stand-in, stated in the report"""
    # ---- statistics
    confidence: float = 0.95
    """confidence level of every interval"""
    n_resamples: int = 10_000
    """bootstrap resamples per interval of a per-prompt metric"""
    set_resamples: int = 200
    """bootstrap resamples (over images) per interval of FID, KID and IS; each recomputes the metric (FID: a 2048x2048
    matrix square root, about a second on a CPU)"""
    # ---- the report
    summary_against: tuple[str, ...] = ()
    """arms whose win rates the report's first table lists besides the baseline's (the study: dpo)"""
    # ---- the human rating kit
    rating_pairs: int = 50
    """pairs per comparison in the double-blind rating kit (rating_kit/page_NN.html, one page per comparison, and
    rating_key.json beside the folder); 0: no kit"""
    rating_criteria: tuple[Criterion, ...] = ("appeal", "alignment", "overall")
    """the questions asked of every pair, in this order, each left / right / tie (Diffusion-DPO's protocol): appeal =
    which image is more visually appealing (the prompt hidden), alignment = which fits the prompt better, overall =
    which one the rater prefers for the prompt"""
    attention_checks: int = 2
    """attention-check pairs per page: one image shown on both sides, where every answer must be tie"""
    max_attention_failures: int | None = 0
    """at ingest, exclude a rater who failed more than this many attention-check questions of the pages they rated
    (answered other than tie, or left unanswered; reported either way); None: keep every rater"""
    ingest_ratings: tuple[str, ...] = ()
    """rater files saved by the kit: only un-blind them with --rating-key (ratings.json and .md beside the key), as
    `python rating_kit.py` does"""
    rating_key: str | None = None
    """the kit's rating_key.json, for --ingest-ratings"""
    # ---- the run
    output_dir: str | None = None
    """images/, results.json, report.md, grid.png, rating_kit/, rating_key.json; None: runs/evaluate-<time>"""
    grid_rows: int = 8
    """prompts (rows) in grid.png"""
    toy: bool = False
    """the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""
    toy_model: Literal["sd15", "sdxl"] = "sd15"
    """with --toy: the SD1.5-shaped toy pipeline or the SDXL-shaped one (common/toy.py toy_sdxl_pipeline) as base"""


def toy_defaults(toy_model: str = "sd15") -> Args:
    """--toy: the toy base, the held-out toy prompts (common/toy.py HELDOUT_PROMPTS: the study never trains on them),
    the toy reward and tiny CLIP as scorers, the toy pretraining images as FID reference (8 images per prompt: 12
    prompts are few units, so each is averaged over more samples), DDIM 20 steps, η = 0 (the scripts' toy evaluations
    use the same)."""
    world = toy_world()
    return Args(toy=True, toy_model=toy_model, model=str(world.pipeline if toy_model == "sd15" else toy_sdxl_pipeline()),
                prompts=str(PROMPT_FILES["heldout"]), images_per_prompt=8,
                sample_steps=20, eta=0.0, guidance_scale=5.0, resolution=world.resolution, per_device_batch=32,
                mixed_precision="no", scorers=("toy", "clip"),
                fid_reference=str(world.pretrain), rating_pairs=12)


def toy_scorer_paths(args: Args) -> dict[str, str]:
    """--toy: the toy world's tiny CLIP for the clip scorers. Merged under --scorer-paths rather than written into
    its default, so naming one scorer's weights (reward-model=...) keeps the others' (else clip reaches for the hub)."""
    if not args.toy:
        return {}
    clip = str(toy_world().clip)
    return {"clip": clip, "clip-raw": clip}


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return tyro.cli(Args, args=argv, default=toy_defaults(toy_model_in(argv)) if "--toy" in argv else None)


# ------------------------------------------------------------------------------------------------ the set metrics
# (the per-prompt paired statistics, bca_interval ... compare, are common/stats.py's)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) on each of `splits` parts of probs (N, classes); (mean, std) over the parts,
    as Salimans et al. 2016 (https://github.com/openai/improved-gan, inception_score/model.py) report it.

    Part i is rows [i·N // splits, (i+1)·N // splits), the original's split (np.array_split puts the remainder in the
    first parts instead, which moves the std by ~7 % at N = 1003). Ours adds 1e-12 inside the logs (the original
    has none: a probability of exactly 0 would give nan) and uses min(splits, N) parts so none is empty."""
    probs, n = probs.astype(np.float64), len(probs)
    splits = min(splits, n)
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        p_y = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(p_y + 1e-12))).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def fid_kid(feats: np.ndarray, ref: dict, seed: int) -> tuple[float, float | None]:
    """FID (clean-fid's frechet_distance on mu, Sigma, exactly fid_from_feats) and KID (clean-fid's kernel_distance;
    needs the reference features) of feats (N, D) against a reference {mu, sigma[, feats]}."""
    from cleanfid import fid

    mu, sigma = feats.mean(axis=0), np.cov(feats, rowvar=False)
    value = float(fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))
    value = max(value, 0.0)  # identical sets come out as -1e-13 (sqrtm round-off); FID is a squared distance
    kid = None
    if "feats" in ref:
        np.random.seed(seed)  # kernel_distance draws its subsets from numpy's global stream
        kid = float(fid.kernel_distance(feats, ref["feats"]))
    return value, kid


def set_metrics(feats: np.ndarray | None, probs: np.ndarray, ref: dict | None, confidence: float, n_resamples: int,
                seed: int) -> dict:
    """FID, KID (with a reference) and IS of one sample of images, each with a bias-corrected percentile bootstrap
    interval over the images: resample the N images with replacement, recompute the metric theta*, and report
        [q_(1-c)/2(theta*) - b,  q_(1+c)/2(theta*) - b],   b = mean(theta*) - theta   (clipped at 0 for FID and KID)
    The shift b because a resample repeats images, which shrinks the sample's spread and moves every FID replicate
    upward by more than its spread (the plain percentile interval would then exclude the estimate itself). The
    reference set is held fixed (its own sampling error is not in the interval). IS is computed with one split (all
    N images): the 10-split mean of `inception_score` has splits of N/10 images, too few for p(y) at N = 96 (the toy).
    KID's replicates are the unbiased MMD^2 of the whole resample, from kernel matrices computed once (clean-fid's
    point estimate averages 100 random subsets; both estimate the same MMD^2, and the shift b aligns them).
    `boot_*` keeps the shifted replicates, for arm_set_metrics.
    """
    rng = np.random.default_rng(seed)
    point, reps = {"is": inception_score(probs, splits=1)[0]}, {"is": []}
    if ref is not None:
        point["fid"], point["kid"] = fid_kid(feats, ref, seed)
        reps["fid"], reps["kid"] = [], []
        if point["kid"] is not None:  # KID's replicates from kernel matrices computed once: O(N^2) per resample
            d = feats.shape[1]
            k_xx = (feats @ feats.T / d + 1) ** 3  # clean-fid's polynomial kernel, (N, N)
            k_xy = ((feats @ ref["feats"].T / d + 1) ** 3).mean(axis=1)  # (N,) each image's mean kernel to the ref
            k_yy = (ref["feats"] @ ref["feats"].T / d + 1) ** 3
            m = len(k_yy)
            yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    for r in range(n_resamples):
        idx = rng.integers(len(probs), size=len(probs))  # (N,)
        reps["is"].append(inception_score(probs[idx], splits=1)[0])
        if ref is not None:
            reps["fid"].append(fid_kid(feats[idx], {"mu": ref["mu"], "sigma": ref["sigma"]}, seed)[0])
            if point["kid"] is not None:  # unbiased MMD^2 of the resample (its off-diagonal pairs) to the reference
                n, sub = len(idx), k_xx[np.ix_(idx, idx)]
                reps["kid"].append((sub.sum() - np.trace(sub)) / (n * (n - 1)) + yy - 2 * k_xy[idx].mean())
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name, value in point.items():
        values = np.array([v for v in reps[name] if v is not None])
        out[name] = value
        if value is None or not len(values):
            out["ci_" + name], out["boot_" + name] = None, []
            continue
        low = 0.0 if name in ("fid", "kid") else -math.inf
        shifted = np.maximum(values - (values.mean() - value), low)  # (R,) replicates less their bias
        out["ci_" + name] = tuple(float(q) for q in np.percentile(shifted, [tail, 100 - tail]))
        out["boot_" + name] = shifted.tolist()  # kept: an arm of several seeds resamples these per seed
    return out


# ------------------------------------------------------------------------------------------------ models and images


@dataclass(frozen=True)
class Model:
    name: str
    pipeline: str  # hub id or folder
    unet: str | None = None  # a UNet2DConditionModel folder that replaces the pipeline's
    lora: str | None = None  # LoRA weights loaded with pipe.load_lora_weights


def resolve_model(name: str, path: str, base: str) -> Model:
    """What NAME=PATH points to, checked in this order (say it in --help and the docs, never guess silently)."""
    p = Path(path)
    config = p / "config.json"
    if (p / "final" / "unet").is_dir():
        return Model(name, base, unet=str(p / "final" / "unet"))
    if (p / "final" / "lora").is_dir():
        return Model(name, base, lora=str(p / "final" / "lora"))
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == "UNet2DConditionModel":
        return Model(name, base, unet=str(p))
    if p.is_dir() and any(p.glob("*lora*.safetensors")):
        return Model(name, base, lora=str(p))
    if (p / "model_index.json").is_file() or (not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
        return Model(name, path)
    raise ValueError(f"--candidates {name}={path}: not a run output dir (final/unet or final/lora), a UNet folder "
                     f"(config.json of a UNet2DConditionModel), a LoRA folder (*lora*.safetensors), a pipeline "
                     f"folder (model_index.json) or a hub id")


def load_pipeline(model: Model, dtype: torch.dtype, device: torch.device):
    """StableDiffusionPipeline or StableDiffusionXLPipeline, chosen from the UNet's config (common/models.py), with
    the candidate's UNet or LoRA. A LoRA saved by our scripts for SDXL loads with StableDiffusionXLPipeline's own
    load_lora_weights."""
    from diffusers import UNet2DConditionModel

    from common.models import SD15, model_family

    family = model_family(model.pipeline)
    # No safety checker (SD1.5; SDXL ships none): it blacks out images, which would be scored as model outputs (the
    # papers' evaluations disable it too); no trust_remote_code anywhere.
    extra = dict(safety_checker=None, requires_safety_checker=False) if family is SD15 else {}
    pipe = family.pipeline_class.from_pretrained(model.pipeline, dtype=dtype, **extra)
    if model.unet:
        pipe.unet = UNet2DConditionModel.from_pretrained(model.unet, dtype=dtype)
    if model.lora:
        pipe.load_lora_weights(model.lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def image_path(out: Path, model: str, i: int, j: int) -> Path:
    return out / "images" / model / f"{i:05d}_{j:02d}.png"


def load_images(images: list) -> list[np.ndarray]:
    """Image files or encoded images (bytes, {'bytes': ...}) -> (H, W, 3) uint8 arrays."""
    return [np.asarray((Image.open(im) if isinstance(im, Path) else decode_image(im)).convert("RGB")) for im in images]


def load_embedder(args: Args, device: torch.device):
    """images (list of (H, W, 3) uint8) -> (features (N, D), class probabilities (N, C)), numpy.

    Real: clean-fid's TorchScript Inception, images resized by its "clean" resizer (PIL bicubic to 299 in float),
    pool3 features for FID/KID and the softmax without the output bias for IS (as stylegan2-ada's IS does). Built
    directly rather than with cleanfid.features.feature_extractor, which downloads into /tmp and wraps the net in
    DataParallel (use_dataparallel=False); here nothing is downloaded and nothing is wrapped.
    Toy stand-in (no Inception weights offline): the tiny CLIP's image embeddings as features, and its zero-shot
    softmax over the 24 toy prompts as the "classifier" of IS.
    """
    if args.toy:
        from transformers import CLIPModel, CLIPProcessor

        clip = CLIPModel.from_pretrained(toy_world().clip).to(device).eval()
        processor = CLIPProcessor.from_pretrained(toy_world().clip)
        text = processor(text=TOY_PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids

        @torch.no_grad()
        def embed(images):
            pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
            out = clip(input_ids=text.to(device), pixel_values=pixels.to(device))
            return out.image_embeds.cpu().numpy(), out.logits_per_image.softmax(-1).cpu().numpy()  # (N, 32), (N, 24)

        return embed, "toy stand-in: tiny CLIP image embeddings (32-d); IS on its zero-shot softmax over toy prompts"
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    path = Path(args.inception_path).expanduser()
    require(path.is_file() and path.name == "inception-2015-12-05.pt",
            f"--inception-path {path}: expected the file inception-2015-12-05.pt (https://nvlabs-fi-cdn.nvidia.com/"
            f"stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt), downloaded once by you")
    net = InceptionV3W(str(path.parent), download=False).to(device).eval()
    resize = build_resizer("clean")

    @torch.no_grad()
    def embed(images):
        x = torch.from_numpy(np.stack([resize(im) for im in images]).transpose(0, 3, 1, 2)).to(device)  # (N,3,299,299)
        probs = net.base(x, no_output_bias=True)  # (N, 1008) softmax; 299 px input is not resized again
        return net(x).cpu().numpy(), probs.cpu().numpy()  # (N, 2048) pool3 features, as clean-fid's "clean" mode

    return embed, "clean-fid Inception (inception-2015-12-05.pt, clean resize)"


def reference_stats(source: str, embed, batch_size: int, out: Path) -> dict:
    """{mu, sigma, feats} of the reference images (a folder at any depth, or a parquet's `image` column), or what an
    .npz holds. Written to out/reference_stats.npz, which a later run can pass as --fid-reference."""
    if source.endswith(".npz"):
        with np.load(source) as f:
            return {k: f[k] for k in f.files if k in ("mu", "sigma", "feats")}
    if source.endswith(".parquet"):
        images = pq.read_table(source, columns=["image"]).column("image").to_pylist()  # encoded until embedded
    else:
        images = sorted(f for f in Path(source).rglob("*") if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    require(len(images) > 1, f"--fid-reference {source}: fewer than 2 images (expected a folder, .parquet or .npz)")
    feats = np.concatenate([embed(load_images(images[i : i + batch_size]))[0]
                            for i in tqdm(range(0, len(images), batch_size), desc="reference features")])
    ref = dict(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), feats=feats)
    np.savez(out / "reference_stats.npz", **ref)
    return ref


# ------------------------------------------------------------------------------------------------ reporting


def summary_table(results: dict, against: tuple[str, ...]) -> list[str]:
    """The table that answers a study's question: per arm, each metric's mean over its seeds [interval], FID / KID /
    IS [interval], and its win rate against each model in `against` per metric, with the Holm-adjusted p."""
    pct, metrics = f"{results['confidence']:.0%}", list(results["comparisons"][0]["metrics"])
    cells = {(c["a"], c["b"]): (c["metrics"], False) for c in results["comparisons"]}
    cells |= {(c["b"], c["a"]): (c["metrics"], True) for c in results["comparisons"]}  # read B's side of "A vs B"
    sets = [s for s in ("fid", "kid", "is") if results["models"][results["baseline"]].get(s) is not None]
    against = [x for x in against if x in results["models"]]
    head = ["arm", "seeds"] + [f"{m} mean" for m in metrics] + [s.upper() for s in sets] + \
        [f"{m} win vs {x} (Holm p)" for x in against for m in metrics]
    lines = [f"## Summary: per arm, the mean over seeds [{pct} interval]; win rate [{pct} interval] (Holm-adjusted "
             "Wilcoxon p over every comparison x metric)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for arm, info in results["models"].items():
        row = [arm, str(info["n_runs"])]
        for m in metrics:
            own = next(((s, flip) for (a, b), (s, flip) in cells.items() if a == arm), None)
            s, flip = own[0][m], own[1]
            row.append(fmt(s["mean_b"], s["ci_b"]) if flip else fmt(s["mean_a"], s["ci_a"]))
        row += [fmt(info[s], info["ci_" + s]) for s in sets]
        for x in against:
            for m in metrics:
                if x == arm:
                    row.append("-")
                    continue
                s, flip = cells[(arm, x)][0][m], cells[(arm, x)][1]
                win, ci = (1 - s["win_rate"], (1 - s["ci_win"][1], 1 - s["ci_win"][0])) if flip else \
                    (s["win_rate"], s["ci_win"])
                row.append(f"{fmt(win, ci)} ({s['p_wilcoxon_holm']:.2g})")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def report_markdown(results: dict, against: tuple[str, ...] = ()) -> str:
    pct, m_total = f"{results['confidence']:.0%}", sum(len(c["metrics"]) for c in results["comparisons"])
    lines = [f"# Evaluation: {results['n_prompts']} prompts x {results['images_per_prompt']} images, seed "
             f"{results['seed']}, DDIM {results['sample_steps']} steps, η {results['eta']:g}", ""]
    if results["warnings"]:
        lines += ["**Warnings**", ""] + [f"- {w}" for w in results["warnings"]] + [""]
    lines += summary_table(results, (results["baseline"], *against))
    lines += [f"Intervals: {pct}; an arm of one run: BCa bootstrap over prompts; of several runs (seeds): percentile "
              "bootstrap over seeds and prompts (seeds_comparison). FID / KID / IS: bias-corrected bootstrap over "
              f"images (and seeds). p-values two-sided; in parentheses Holm-adjusted across all {m_total} comparison "
              "x metric cells of this report, per test.", ""]
    for c in results["comparisons"]:
        lines += [f"## {c['a']} vs {c['b']}", "", f"| metric | {c['a']} | {c['b']} | difference | {c['a']} win rate "
                  "| W/T/L (prompts) | sign p (Holm) | Wilcoxon p (Holm) |", "|---|---|---|---|---|---|---|---|"]
        for m, s in c["metrics"].items():
            lines.append(f"| {m} | {fmt(s['mean_a'], s['ci_a'])} | {fmt(s['mean_b'], s['ci_b'])} | "
                         f"{fmt(s['diff'], s['ci_diff'])} | {fmt(s['win_rate'], s['ci_win'])} | "
                         f"{s['wins']}/{s['ties']}/{s['losses']} | {s['p_sign']:.3g} ({s['p_sign_holm']:.3g}) | "
                         f"{s['p_wilcoxon']:.3g} ({s['p_wilcoxon_holm']:.3g}) |")
        lines.append("")
    if results["feature_extractor"]:
        lines += [f"## Set metrics per run ({results['feature_extractor']})", "",
                  f"| run | images | FID [{pct}] | KID [{pct}] | IS, 1 split [{pct}] | IS (mean ± std, 10 splits) |",
                  "|---|---|---|---|---|---|"]
        for name, m in results["runs"].items():
            cell = lambda s: "-" if m.get(s) is None else fmt(m[s], m["ci_" + s])  # noqa: E731
            lines.append(f"| {name} | {m['n_images']} | {cell('fid')} | {cell('kid')} | {cell('is')} | "
                         f"{m['is_splits'][0]:.4g} ± {m['is_splits'][1]:.2g} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def check_args(args: Args) -> Args:
    """Reject what cannot run, naming the flag; fill the output dir; --toy without candidates trains one."""
    require(not args.ingest_ratings or args.rating_key is not None,
            "--ingest-ratings needs --rating-key rating_key.json")
    require(torch.cuda.is_available() or args.mixed_precision != "fp16" or bool(args.ingest_ratings),
            "--mixed-precision fp16 needs a GPU; pass --mixed-precision no on a CPU")
    require(args.images_per_prompt >= 1 and args.per_device_batch >= 1, "--images-per-prompt and --per-device-batch must be >= 1")
    require(0 < args.confidence < 1, f"--confidence {args.confidence}: must be in (0, 1)")
    require(args.n_resamples >= 100, f"--n-resamples {args.n_resamples}: BCa needs at least a few hundred")
    require(args.rating_pairs >= 0 and args.grid_rows >= 1, "--rating-pairs must be >= 0 and --grid-rows >= 1")
    require(args.attention_checks >= 0 and len(args.rating_criteria) >= 1 and
            len(set(args.rating_criteria)) == len(args.rating_criteria),
            "--attention-checks must be >= 0 and --rating-criteria a non-empty list without repeats")
    require(args.set_resamples >= 20 and args.sample_steps >= 1 and args.eta >= 0,
            "--set-resamples must be >= 20, --sample-steps >= 1 and --eta >= 0")
    require(args.fid_reference is None or args.toy or args.inception_path is not None,
            "--fid-reference needs --inception-path (a local inception-2015-12-05.pt); we never download it")
    require(len(set(args.scorers)) == len(args.scorers), f"--scorers {args.scorers}: a scorer listed twice")
    for spec in args.scorer_paths + args.clip_paths:
        require(spec.partition("=")[0] in get_args(ScorerName), f"--scorer-paths / --clip-paths {spec!r}: expected NAME=PATH "
                f"with NAME one of {get_args(ScorerName)}")
    if args.toy and not args.candidates and not args.ingest_ratings:
        # a cache: trained once, reused by later --toy evaluations
        run = REPO / "runs" / ("evaluate-toy-dpo" + ("" if args.toy_model == "sd15" else f"-{args.toy_model}"))
        if not (run / "final" / "unet").is_dir():
            print(f"no candidate given: training one with `python diffusion_dpo.py --toy --toy-model {args.toy_model} "
                  f"--output-dir {run}`")
            subprocess.run([sys.executable, str(REPO / "diffusion_dpo.py"), "--toy", "--toy-model", args.toy_model,
                            "--output-dir", str(run), "--overwrite"], check=True, cwd=REPO)  # replaces the debris of
            #                                                                         an interrupted training
        args = replace(args, candidates=(f"dpo={run}",))
    default_dir = REPO / "runs" / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    return replace(args, output_dir=args.output_dir or str(default_dir))


def parse_candidates(args: Args) -> dict[str, list[Model]]:
    """{arm: [its runs]}: "base" (the --model), then each NAME=PATH[,PATH..] of --candidates. A run of an arm
    with several seeds is named NAME_runS (its images' folder); an arm of one run keeps the arm's name."""
    arms = {"base": [Model("base", args.model)]}
    for spec in args.candidates:
        name, sep, paths = spec.partition("=")
        require(sep == "=" and re.fullmatch(r"[\w.-]+", name) is not None and "_run" not in name,
                f"--candidates {spec!r}: expected NAME=PATH[,PATH..], NAME of letters, digits, _ . - (not '_run')")
        require(name not in arms, f"--candidates: the name {name!r} is given twice (or is 'base')")
        runs = [p for p in paths.split(",") if p]
        require(len(runs) >= 1, f"--candidates {spec!r}: no path")
        arms[name] = [resolve_model(name if len(runs) == 1 else f"{name}_run{s}", p, args.model)
                      for s, p in enumerate(runs)]
    require(len(arms) >= 2, "--candidates: give at least one model to compare with the base")
    return arms


def arm_set_metrics(runs: list[dict], confidence: float, seed: int) -> dict:
    """An arm's FID / KID / IS: the mean over its runs (seeds), with an interval from replicates that resample the
    runs and, inside each, the images (each run's bias-corrected bootstrap replicates `boot_*` of set_metrics)."""
    rng, tail, out = np.random.default_rng(seed), 100 * (1 - confidence) / 2, {}
    for name in ("fid", "kid", "is"):
        if runs[0].get(name) is None:
            continue
        out[name] = float(np.mean([r[name] for r in runs]))
        boot = np.array([r["boot_" + name] for r in runs])  # (S, R)
        if len(runs) == 1:
            out["ci_" + name] = runs[0]["ci_" + name]
            continue
        pick = rng.integers(len(runs), size=(boot.shape[1], len(runs)))  # (R, S) runs drawn per replicate
        reps = boot[pick, np.arange(boot.shape[1])[:, None]].mean(axis=1)  # (R,)
        out["ci_" + name] = tuple(float(q) for q in np.percentile(reps, [tail, 100 - tail]))
    return out


def sample_warnings(results: dict, arms: dict[str, list[Model]], feature_dim: int | None) -> list[str]:
    """What makes a number in this report unreliable, said in the report rather than left to the reader."""
    warn, counts = [], {m.name: results["runs"][m.name]["n_images"] for runs in arms.values() for m in runs}
    if len(set(counts.values())) > 1:
        warn.append(f"unequal image counts {counts}: FID and KID are biased by the count (FID by O(1/N)); compare "
                    "only models with equal counts")
    n = min(counts.values())
    if feature_dim is not None and n < 2048:
        warn.append(f"{n} images per model, fewer than 2,048 (Inception's feature dimension): FID's covariance is "
                    "rank-deficient and the value is biased upward; compare FIDs only at equal counts, and prefer "
                    "KID (unbiased) or more images")
    if results["n_prompts"] < 20:
        warn.append(f"{results['n_prompts']} prompts: the prompt-level tests have little power (Wilcoxon's smallest "
                    f"two-sided p with n prompts is 2/2^n)")
    return warn


def main(args: Args) -> dict:
    args = check_args(args)
    if args.ingest_ratings:  # ---- un-blind the raters' files (rating_kit.py); no sampling, no scoring
        return rating_kit.write_ratings(args.ingest_ratings, args.rating_key, args.confidence, args.n_resamples,
                                        args.seed, args.max_attention_failures)

    dist = setup_distributed()
    out = Path(args.output_dir)
    arms = parse_candidates(args)
    require(args.baseline in arms, f"--baseline {args.baseline!r}: not one of {list(arms)}")
    models = [m for runs in arms.values() for m in runs]
    prompts = load_prompts(args.prompts)[: args.max_prompts]
    n, k = len(prompts), args.images_per_prompt
    require(n >= 2, f"--prompts {args.prompts}: {n} prompt(s); the statistics need at least 2")
    others = [a for a in arms if a != args.baseline]
    comparisons = [(c, args.baseline) for c in others] + list(itertools.combinations(others, 2))
    if dist.is_main:
        write_args(out, args)
        print(f"{len(models)} models ({len(arms)} arms) x {n} prompts x {k} images = {len(models) * n * k} images "
              f"({dist.world_size} process(es), {args.per_device_batch} per call), DDIM {args.sample_steps} steps, η "
              f"{args.eta:g}; {len(comparisons)} comparisons x {len(args.scorers)} metrics, Holm across all "
              f"{len(comparisons) * len(args.scorers)}; {args.n_resamples} bootstrap resamples per interval")
        for m in models:
            print(f"  {m.name}: {m.pipeline}" + (f" + UNet {m.unet}" if m.unet else "")
                  + (f" + LoRA {m.lora}" if m.lora else ""))

    # ---- 1. sample: the same seeds for every model; images on disk are kept (resume); ranks split the rest
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    # generation.json keys a model's images by what determines them: the bytes of its weights, the sampler, and the
    # prompt of each row i (its sha256), so a re-run with other --prompts redraws the rows whose prompt changed.
    todo, stamps = {}, {}  # model -> this rank's missing (i, j), listed by every rank before any rank writes an image
    ids = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in prompts]
    for model in models:
        stamp = out / "images" / model.name / "generation.json"
        record = dict(model=vars(model), weights=fingerprint(model.pipeline, model.unet, model.lora, dist=dist),
                      seed=args.seed, steps=args.sample_steps, eta=args.eta, guidance=args.guidance_scale,
                      resolution=args.resolution, mixed_precision=args.mixed_precision)
        old = json.loads(stamp.read_text()) if stamp.exists() else {**record, "prompts": []}
        drawn = old.pop("prompts", None)
        changed = sorted(f for f in record.keys() | old.keys() if record.get(f) != old.get(f))
        require(not changed and drawn is not None, f"{stamp.parent}: drawn with other settings than now "
                f"({', '.join(changed) or 'prompts'} differ, or were not recorded: generation.json); its images are "
                f"kept: use a new --output-dir")
        stale = [i for i in range(min(n, len(drawn))) if drawn[i] != ids[i]]  # rows drawn for another prompt
        redraw = set(stale)
        missing = [(i, j) for i in range(n) for j in range(k)
                   if i in redraw or not image_path(out, model.name, i, j).exists()]
        todo[model] = missing[dist.rank :: dist.world_size]
        stamps[model] = (stamp, {**record, "prompts": ids + drawn[n:]}, stale, missing)
    barrier()  # every rank has listed its work before rank 0 removes a stale image
    for model, (stamp, record, stale, missing) in stamps.items():
        if dist.is_main and missing:
            for i, j in itertools.product(stale, range(k)):  # before the stamp names the new prompt of row i
                image_path(out, model.name, i, j).unlink(missing_ok=True)
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(record) + "\n")
        if dist.is_main and stale:
            print(f"{model.name}: the prompt of {len(stale)} of the rows drawn before changed (--prompts; "
                  f"{stamp}): their {len(stale) * k} images are drawn again")
    barrier()
    from diffusers import DDIMScheduler

    for model in [m for m in models if todo[m]]:
        pipe = load_pipeline(model, dtype, dist.device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # every model on one sampler, with η
        for start in tqdm(range(0, len(todo[model]), args.per_device_batch), desc=f"sampling {model.name}",
                          disable=not dist.is_main):
            batch = todo[model][start : start + args.per_device_batch]
            # CPU generators: the same initial noise on any GPU or CPU, so images are comparable across machines.
            generators = [torch.Generator().manual_seed(args.seed + i + 100_000 * j) for i, j in batch]
            images = pipe([prompts[i] for i, _ in batch], num_inference_steps=args.sample_steps, eta=args.eta,
                          guidance_scale=args.guidance_scale, generator=generators, height=args.resolution,
                          width=args.resolution).images
            for (i, j), image in zip(batch, images):  # write-then-rename: a killed run leaves no half-written PNG
                image.save(tmp := image_path(out, model.name, i, j).with_suffix(".tmp"), format="PNG")
                tmp.replace(image_path(out, model.name, i, j))
        del pipe
    barrier()
    if not dist.is_main:
        cleanup_distributed()
        return {}

    # ---- 2. score every image from its PNG, so a resumed run scores exactly what a fresh one does
    paths = {**toy_scorer_paths(args), **dict(spec.split("=", 1) for spec in args.scorer_paths)}
    clip_paths = dict(spec.split("=", 1) for spec in args.clip_paths)
    scorers = {s: load_scorer(s, paths.get(s), clip_path=clip_paths.get(s), device=dist.device,
                              flags=(f"--scorer-paths {s}=PATH", f"--clip-paths {s}=PATH"),
                              batch_size=args.per_device_batch) for s in args.scorers}
    embed, feature_extractor = load_embedder(args, dist.device) if args.toy or args.inception_path else (None, None)
    ref = reference_stats(args.fid_reference, embed, args.per_device_batch, out) if embed and args.fid_reference else None
    scores = {m.name: {s: np.zeros((n, k)) for s in scorers} for m in models}  # run -> metric -> (n, k)
    results = dict(n_prompts=n, images_per_prompt=k, seed=args.seed, sample_steps=args.sample_steps, eta=args.eta,
                   confidence=args.confidence, feature_extractor=feature_extractor, baseline=args.baseline,
                   arms={a: [m.name for m in runs] for a, runs in arms.items()}, runs={}, models={}, comparisons=[])
    items = [(i, j) for i in range(n) for j in range(k)]
    feature_dim = None
    for model in models:
        feats, probs = [], []
        for start in tqdm(range(0, len(items), args.per_device_batch), desc=f"scoring {model.name}"):
            batch = items[start : start + args.per_device_batch]
            images = load_images([image_path(out, model.name, i, j) for i, j in batch])
            pixels = torch.from_numpy(np.stack(images)).to(dist.device).permute(0, 3, 1, 2).float() / 255  # (B,3,H,W)
            for s, scorer in scorers.items():
                with torch.no_grad():
                    values = scorer(pixels, [prompts[i] for i, _ in batch]).cpu().numpy()  # (B,)
                for (i, j), v in zip(batch, values):
                    scores[model.name][s][i, j] = v
            if embed:
                f, p = embed(images)  # (B, D), (B, classes)
                feats.append(f), probs.append(p)
        entry = dict(source=vars(model), n_images=len(items),
                     per_image={s: v.tolist() for s, v in scores[model.name].items()})  # (n, k) per metric
        if embed:
            feats, probs = np.concatenate(feats), np.concatenate(probs)
            feature_dim = feats.shape[1]
            entry |= set_metrics(feats, probs, ref, args.confidence, args.set_resamples, args.seed)
            entry["is_splits"] = inception_score(probs)  # (mean, std) over 10 splits, as Salimans et al. report
        results["runs"][model.name] = entry
    for arm, runs in arms.items():  # an arm's numbers: the mean over its runs, intervals over seeds and images
        results["models"][arm] = dict(n_runs=len(runs), n_images=len(items),
                                      **arm_set_metrics([results["runs"][m.name] for m in runs], args.confidence,
                                                        args.seed))
    for entry in results["runs"].values():
        for name in ("fid", "kid", "is"):
            entry.pop("boot_" + name, None)

    # ---- 3. compare: candidates against the baseline, then pairwise; Holm across every comparison x metric
    stack = lambda arm, s: np.stack([scores[m.name][s] for m in arms[arm]])  # noqa: E731  (S, n, k)
    for a, b in comparisons:
        metrics = {s: compare(stack(a, s), stack(b, s), args.confidence, args.n_resamples, args.seed)
                   for s in scorers}
        entry = dict(a=a, b=b, metrics=metrics)
        if ref is not None:  # FID falls with the sample count (its bias is O(1/N)): compare equal counts only
            entry["fid_diff"] = results["models"][a]["fid"] - results["models"][b]["fid"]
        results["comparisons"].append(entry)
    holm_across(results["comparisons"])
    results["warnings"] = sample_warnings(results, arms, feature_dim)

    # ---- 4. write results.json, report.md, grid.png (rows: prompt; columns: every run, named), the kit
    (out / "results.json").write_text(json.dumps(dict(args=json.loads((out / "args.json").read_text()), **results),
                                                 indent=1) + "\n")
    report = report_markdown(results, args.summary_against)
    (out / "report.md").write_text(report)
    order, rows = [m.name for m in models], range(min(args.grid_rows, n))
    tiles = [Image.open(image_path(out, m, i, 0)).convert("RGB") for i in rows for m in order]
    side = min(tiles[0].width, 256)
    first = next(iter(scorers))  # each tile's score: the first scorer's, of that image
    headers = [Image.new("RGB", (side, side), "white") for _ in order]  # a blank row: column names as captions
    captions = order + [(f"{prompts[i]}: " if c == 0 else "") + f"{first} {scores[m][first][i, 0]:.3g}"
                        for i in rows for c, m in enumerate(order)]
    save_image_grid(headers + [t.resize((side, side)) for t in tiles], out / "grid.png", nrow=len(order),
                    captions=captions, upscale=max(1, 128 // side))
    if args.rating_pairs:
        names = {a: [m.name for m in r] for a, r in arms.items()}
        kit, key_file = rating_kit.export_rating_kit(out, lambda run, i, j: image_path(out, run, i, j), prompts,
                                                     comparisons, names, k, args.rating_pairs, args.seed,
                                                     args.rating_criteria, args.attention_checks, pixelated=side < 128)
        print(f"rating kit: send the pages in {kit} (page_*.html) to the raters, keep {key_file}; then run\n"
              f"  python evaluate.py --ingest-ratings <their files> --rating-key {key_file}")
    print(report + f"\nwrote {out / 'results.json'}, {out / 'report.md'}, {out / 'grid.png'}")
    cleanup_distributed()
    return results


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    main(parse_args())
