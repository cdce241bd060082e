"""Evaluate text-to-image models against a baseline: paired samples, scores, and honest statistics.

Every model draws the same images: prompt i, image j uses seed `seed + i + 100000 j`, so the baseline's and a
candidate's image j of prompt i share their initial noise and differ only by the model. The prompt is the unit of
analysis (Diffusion-DPO, DPOK and Pick-a-Pic report win rates over prompts, mostly without intervals):

    s_i^A = (1/k) sum_j r(x_ij^A, c_i)          mean score of model A's k images of prompt c_i, for a scorer r
    d_i = s_i^A - s_i^B                          paired difference, i = 1..n prompts
    Delta = (1/n) sum_i d_i                      mean difference, with a BCa bootstrap interval over prompts
    W = (1/n) sum_i (1[d_i > 0] + 1/2 1[d_i = 0])    win rate of A over B (ties count 1/2), BCa interval
    sign test:  #{d_i > 0} ~ Binomial(#{d_i != 0}, 1/2) under H0;   Wilcoxon signed-rank test of the d_i
    Holm:       p~_(m') = max_{j <= m'} min(1, (M - j + 1) p_(j))  over the M metrics of one comparison

Scorers r (common/scorers.py): CLIP score 100 max(cos, 0) per image (Hessel et al.'s clamp; `clip-raw` gives
torchmetrics' unclamped 100 cos), PickScore, HPS v2.1 (100 cos), ImageReward, LAION aesthetic, a reward model trained
by reward_model.py, the toy reward. Set metrics, one number per model (no per-prompt pairing, compared only at equal
sample counts): FID = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)) and KID (unbiased MMD^2, cubic kernel)
on Inception pool features against a reference set, and Inception Score exp(E_x KL(p(y|x) || p(y))), all with
clean-fid's functions on clean-fid's TorchScript Inception (https://github.com/GaParmar/clean-fid).

A double-blind human rating kit is written next to the scores (rating_kit/index.html, rating_kit/key.json) and
ingested back into win rates with the same intervals and tests, plus Fleiss' kappa across raters.

Usage:
    python evaluate.py --candidates dpo=runs/diffusion_dpo-XXXX sft=runs/sft-XXXX/final/lora \
        --prompts partiprompts --fid-reference coco_val2014/ --inception-path ~/inception-2015-12-05.pt
    torchrun --nproc_per_node 8 evaluate.py --candidates dpo=runs/diffusion_dpo-XXXX   # sampling split over GPUs
    python evaluate.py --candidates dpo=runs/diffusion_dpo-XXXX --prompts pickapic \
        --scorers pickscore hps aesthetic clip imagereward --scorer-paths aesthetic=sac+logos+ava1-l14-linearMSE.pth
    python evaluate.py --ingest-ratings alice.json bob.json --rating-key runs/evaluate-XXXX/rating_kit/key.json
    python evaluate.py --toy            # the toy base against a toy diffusion_dpo.py run (trained first if missing)
"""

import base64
import hashlib
import io
import itertools
import json
import math
import random
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow.parquet as pq
import scipy.stats
import torch
import tyro
from PIL import Image
from tqdm import tqdm

from common.data import decode_image, load_prompts
from common.runtime import barrier, cleanup_distributed, require, save_image_grid, setup_distributed, write_args
from common.scorers import ScorerName, load_scorer
from common.toy import PROMPTS as TOY_PROMPTS
from common.toy import toy_world

REPO = Path(__file__).resolve().parent
# toy, clip, clip-raw, pickscore, hps, imagereward, aesthetic, reward-model: see common/scorers.py


@dataclass
class Args:
    # ---- the models
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """pipeline (hub id or folder): the model named "base", and the pipeline UNet/LoRA candidates are loaded into"""
    candidates: tuple[str, ...] = ()
    """NAME=PATH each, PATH one of (checked in this order): a run's output dir (its final/unet or final/lora), a UNet
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
    num_inference_steps: int = 50
    """sampler steps, with the pipeline's own scheduler"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight (diffusers' SD1.5 default)"""
    resolution: int | None = None
    """image side in pixels; None: the pipeline's default (512 for SD1.5)"""
    batch_size: int = 16
    """images per pipeline call and per scorer call, per GPU"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """dtype of the weights for sampling (inference needs no fp32 master copy); "no" on a CPU"""
    # ---- metrics
    scorers: tuple[ScorerName, ...] = ("clip", "pickscore")
    """per-image scorers (common/scorers.py); aesthetic and reward-model need --scorer-paths. Diffusion-DPO's table:
    pickscore hps aesthetic clip imagereward; DPOK's: imagereward"""
    scorer_paths: tuple[str, ...] = ()
    """NAME=PATH: a scorer's weights when not its default hub id, e.g. aesthetic=sac+logos+ava1-l14-linearMSE.pth
    reward-model=runs/reward_model-XXXX/final"""
    scorer_clip_paths: tuple[str, ...] = ()
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
    """bootstrap resamples per interval"""
    # ---- the human rating kit
    rating_pairs: int = 50
    """pairs per comparison in the double-blind rating kit (rating_kit/index.html and key.json); 0: no kit"""
    ingest_ratings: tuple[str, ...] = ()
    """rater files saved by the kit: only un-blind them with --rating-key (ratings.json and .md beside the key)"""
    rating_key: str | None = None
    """the kit's key.json, for --ingest-ratings"""
    # ---- the run
    output_dir: str | None = None
    """images/, results.json, report.md, grid.png, rating_kit/; None: runs/evaluate-<time>"""
    grid_rows: int = 8
    """prompts (rows) in grid.png"""
    toy: bool = False
    """the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""


def toy_defaults() -> Args:
    """--toy: the toy base and prompts, the toy reward and tiny CLIP as scorers, the toy pretraining images as FID
    reference (4 images per prompt: 24 prompts are few units, so each is averaged over more samples)."""
    world = toy_world()
    return Args(toy=True, base_model=str(world.pipeline), prompts=str(world.prompts), images_per_prompt=4,
                num_inference_steps=25, guidance_scale=5.0, resolution=world.resolution, batch_size=32,
                mixed_precision="no", scorers=("toy", "clip"), scorer_paths=(f"clip={world.clip}",),
                fid_reference=str(world.pretrain), rating_pairs=12)


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return tyro.cli(Args, args=argv, default=toy_defaults() if "--toy" in argv else None)


# ------------------------------------------------------------------------------------------------ the statistics


def bca_interval(x: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """scipy's BCa bootstrap interval of the mean of x (n,); a constant x gets a point (BCa is undefined there)."""
    if len(x) < 2 or np.ptp(x) == 0:
        return (float(x[0]), float(x[0])) if len(x) else (math.nan, math.nan)
    res = scipy.stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                                rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def sign_test(d: np.ndarray) -> tuple[int, int, int, float]:
    """(wins, ties, losses, two-sided p) of the sign test: wins ~ Binomial(wins + losses, 1/2) under H0."""
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return wins, len(d) - wins - losses, losses, float(p)


def wilcoxon_test(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of the d_i; 1 if all are zero. Zero differences are dropped first (Wilcoxon's
    own rule), so scipy can use the exact null distribution for up to 50 nonzero d_i (with zeros it falls back to
    the normal approximation)."""
    d = d[d != 0]
    return float(scipy.stats.wilcoxon(d).pvalue) if len(d) else 1.0


def paired_comparison(scores_a: np.ndarray, scores_b: np.ndarray, confidence: float = 0.95,
                      n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Model A against model B on one metric, the prompt as the unit. scores_*: (n prompts, k images), paired.

        s_i = mean_j scores_ij,  d_i = s_i^A - s_i^B,  w_i = 1[d_i > 0] + 1/2 1[d_i = 0]
        mean_a, mean_b, diff = mean_i d_i, win_rate = mean_i w_i, each with a BCa interval over the n prompts;
        p_sign (sign test on wins vs losses, ties dropped) and p_wilcoxon (signed-rank test of d), two-sided.
    """
    require(scores_a.shape == scores_b.shape, f"unpaired scores: {scores_a.shape} vs {scores_b.shape}")
    s_a, s_b = scores_a.mean(axis=1), scores_b.mean(axis=1)  # (n,)
    d = s_a - s_b  # (n,)
    w = (d > 0) + 0.5 * (d == 0)  # (n,)
    ci = lambda x: bca_interval(x, confidence, n_resamples, seed)  # noqa: E731
    wins, ties, losses, p_sign = sign_test(d)
    return dict(mean_a=float(s_a.mean()), ci_a=ci(s_a), mean_b=float(s_b.mean()), ci_b=ci(s_b),
                diff=float(d.mean()), ci_diff=ci(d), win_rate=float(w.mean()), ci_win=ci(w),
                wins=wins, ties=ties, losses=losses, p_sign=p_sign, p_wilcoxon=wilcoxon_test(d), n=len(d))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order. With p_(1) <= ... <= p_(M),

        p~_(i) = max_{j <= i} min(1, (M - j + 1) p_(j));   reject H_(i) at level alpha iff p~_(i) <= alpha,

    which bounds the family-wise error rate by alpha under any dependence between the tests (Holm 1979).
    """
    order = np.argsort(pvalues, kind="stable")
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of counts (N items, K categories): counts[i, c] = raters who put item i in category c. Items
    rated by n_i >= 2 raters count; with equal n_i this is Fleiss (1971):

        P_i = (sum_c n_ic^2 - n_i) / (n_i (n_i - 1)),  P_bar = mean_i P_i,  p_c = sum_i n_ic / sum_i n_i,
        P_e = sum_c p_c^2,  kappa = (P_bar - P_e) / (1 - P_e)
    """
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts.sum(axis=1) >= 2]
    if len(counts) == 0:
        return math.nan
    n_i = counts.sum(axis=1)
    p_bar = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_e = ((counts.sum(axis=0) / n_i.sum()) ** 2).sum()
    return float((p_bar.mean() - p_e) / (1 - p_e)) if p_e < 1 else math.nan


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


# ------------------------------------------------------------------------------------------------ the rating kit


def export_rating_kit(out: Path, prompts: list[str], pairs_of_models: list[tuple[str, str]], k: int, n_pairs: int,
                      seed: int, pixelated: bool = False) -> Path:
    """rating_kit/index.html (self-contained, names hidden, left/right random) and rating_kit/key.json (the truth).
    Per comparison, n_pairs distinct prompts, each with a random image j; all pairs are shuffled together."""
    rng = random.Random(seed)
    key = []
    for a, b in pairs_of_models:
        for i in rng.sample(range(len(prompts)), min(n_pairs, len(prompts))):
            left, right = (a, b) if rng.random() < 0.5 else (b, a)
            key.append(dict(prompt_idx=i, image=rng.randrange(k), prompt=prompts[i], a=a, b=b, left=left, right=right))
    rng.shuffle(key)
    for n, row in enumerate(key):
        row["id"] = f"q{n:04d}"  # ids say nothing about the models
    kit_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def data_uri(model: str, row: dict) -> str:
        buf = io.BytesIO()  # JPEG keeps a 100-pair kit of 512 px images near 10 MB; the PNGs stay on disk
        Image.open(image_path(out, model, row["prompt_idx"], row["image"])).convert("RGB").save(buf, "JPEG", quality=92)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()

    page = dict(kit_id=kit_id, pixelated=pixelated, pairs=[dict(id=r["id"], prompt=r["prompt"],
                left=data_uri(r["left"], r), right=data_uri(r["right"], r)) for r in key])
    kit = out / "rating_kit"
    kit.mkdir(parents=True, exist_ok=True)
    html = (REPO / "common" / "rating_kit.html").read_text()
    # "<" as \u003c: no prompt text can close the <script> element that holds the JSON
    (kit / "index.html").write_text(html.replace("__KIT_JSON__", json.dumps(page).replace("<", "\\u003c")))
    (kit / "key.json").write_text(json.dumps(dict(kit_id=kit_id, comparisons=pairs_of_models, pairs=key), indent=1))
    return kit


def ingest_ratings(rater_files: tuple[str, ...], key_path: str, confidence: float, n_resamples: int, seed: int) -> dict:
    """Un-blind every rater's choices with the key. Per comparison (A, B) and pair i, x_i = mean over the raters of
    1 (A chosen), 1/2 (tie), 0 (B chosen); the win rate mean_i x_i gets a BCa interval over pairs, the sign test
    counts pairs with x_i > 1/2 against x_i < 1/2, Wilcoxon tests x_i - 1/2; Fleiss' kappa over {A, tie, B}."""
    key = json.loads(Path(key_path).read_text())
    pairs = {row["id"]: row for row in key["pairs"]}
    votes: dict[str, dict[str, float]] = {}  # pair id -> rater -> 1 (A chosen), 1/2 (tie), 0 (B chosen)
    raters = []
    for file in rater_files:
        record = json.loads(Path(file).read_text())
        require(record.get("kit_id") == key["kit_id"],
                f"{file}: kit_id {record.get('kit_id')!r} is not this key's {key['kit_id']!r} (another kit?)")
        rater = record.get("rater") or Path(file).stem
        require(rater not in raters, f"{file}: rater {rater!r} appears twice")
        raters.append(rater)
        for pid, choice in record["choices"].items():
            require(pid in pairs and choice in ("left", "right", "tie"), f"{file}: bad choice {pid!r}: {choice!r}")
            row = pairs[pid]
            winner = {"left": row["left"], "right": row["right"], "tie": None}[choice]  # un-blinded
            votes.setdefault(pid, {})[rater] = 0.5 if winner is None else float(winner == row["a"])
    results = []
    for a, b in key["comparisons"]:
        ids = [pid for pid, r in pairs.items() if (r["a"], r["b"]) == (a, b) and pid in votes]
        x = np.array([np.mean(list(votes[pid].values())) for pid in ids])  # (pairs rated,)
        if len(x) == 0:
            continue
        counts = np.array([[sum(v == c for v in votes[pid].values()) for c in (1.0, 0.5, 0.0)] for pid in ids])
        wins, ties, losses, p_sign = sign_test(x - 0.5)
        results.append(dict(a=a, b=b, n_pairs=len(x), n_judgements=int(counts.sum()), win_rate=float(x.mean()),
                            ci_win=bca_interval(x, confidence, n_resamples, seed), wins=wins, ties=ties,
                            losses=losses, p_sign=p_sign, p_wilcoxon=wilcoxon_test(x - 0.5),
                            fleiss_kappa=fleiss_kappa(counts)))
    return dict(kit_id=key["kit_id"], raters=raters, comparisons=results)


# ------------------------------------------------------------------------------------------------ reporting


def fmt(x: float, ci=None) -> str:
    return f"{x:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci is not None else "")


def report_markdown(results: dict) -> str:
    pct = f"{results['confidence']:.0%}"
    lines = [f"# Evaluation: {results['n_prompts']} prompts x {results['images_per_prompt']} images, seed "
             f"{results['seed']}", "", f"Intervals: {pct} BCa bootstrap over prompts. p-values two-sided; Holm-"
             "adjusted across the metrics of each comparison in parentheses.", ""]
    for c in results["comparisons"]:
        lines += [f"## {c['a']} vs {c['b']}", "", f"| metric | {c['a']} | {c['b']} | difference | {c['a']} win rate "
                  "| W/T/L | sign p (Holm) | Wilcoxon p (Holm) |", "|---|---|---|---|---|---|---|---|"]
        for m, s in c["metrics"].items():
            lines.append(f"| {m} | {fmt(s['mean_a'], s['ci_a'])} | {fmt(s['mean_b'], s['ci_b'])} | "
                         f"{fmt(s['diff'], s['ci_diff'])} | {fmt(s['win_rate'], s['ci_win'])} | "
                         f"{s['wins']}/{s['ties']}/{s['losses']} | {s['p_sign']:.3g} ({s['p_sign_holm']:.3g}) | "
                         f"{s['p_wilcoxon']:.3g} ({s['p_wilcoxon_holm']:.3g}) |")
        lines.append("")
    if results["feature_extractor"]:
        lines += [f"## Set metrics ({results['feature_extractor']})", "",
                  "| model | images | FID | KID | IS (mean ± std over 10 splits) |", "|---|---|---|---|---|"]
        for name, m in results["models"].items():
            kid = "-" if m.get("kid") is None else f"{m['kid']:.4g}"
            fid = "-" if m.get("fid") is None else f"{m['fid']:.4g}"
            lines.append(f"| {name} | {m['n_images']} | {fid} | {kid} | {m['is'][0]:.4g} ± {m['is'][1]:.2g} |")
        lines.append("")
    return "\n".join(lines)


def ratings_markdown(r: dict) -> str:
    lines = [f"# Human ratings: {len(r['raters'])} raters ({', '.join(r['raters'])})", "",
             "| A vs B | pairs | judgements | A win rate [CI] | W/T/L (pairs) | sign p | Wilcoxon p | Fleiss' kappa |",
             "|---|---|---|---|---|---|---|---|"]
    for c in r["comparisons"]:
        lines.append(f"| {c['a']} vs {c['b']} | {c['n_pairs']} | {c['n_judgements']} | "
                     f"{fmt(c['win_rate'], c['ci_win'])} | {c['wins']}/{c['ties']}/{c['losses']} | "
                     f"{c['p_sign']:.3g} | {c['p_wilcoxon']:.3g} | {c['fleiss_kappa']:.3f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def check_args(args: Args) -> Args:
    """Reject what cannot run, naming the flag; fill the output dir; --toy without candidates trains one."""
    require(not args.ingest_ratings or args.rating_key is not None, "--ingest-ratings needs --rating-key key.json")
    require(torch.cuda.is_available() or args.mixed_precision != "fp16" or bool(args.ingest_ratings),
            "--mixed-precision fp16 needs a GPU; pass --mixed-precision no on a CPU")
    require(args.images_per_prompt >= 1 and args.batch_size >= 1, "--images-per-prompt and --batch-size must be >= 1")
    require(0 < args.confidence < 1, f"--confidence {args.confidence}: must be in (0, 1)")
    require(args.n_resamples >= 100, f"--n-resamples {args.n_resamples}: BCa needs at least a few hundred")
    require(args.rating_pairs >= 0 and args.grid_rows >= 1, "--rating-pairs must be >= 0 and --grid-rows >= 1")
    require(args.fid_reference is None or args.toy or args.inception_path is not None,
            "--fid-reference needs --inception-path (a local inception-2015-12-05.pt); we never download it")
    require(len(set(args.scorers)) == len(args.scorers), f"--scorers {args.scorers}: a scorer listed twice")
    for spec in args.scorer_paths + args.scorer_clip_paths:
        require(spec.partition("=")[0] in get_args(ScorerName), f"--scorer-(clip-)paths {spec!r}: expected NAME=PATH "
                f"with NAME one of {get_args(ScorerName)}")
    if args.toy and not args.candidates and not args.ingest_ratings:
        run = REPO / "runs" / "evaluate-toy-dpo"  # a cache: trained once, reused by later --toy evaluations
        if not (run / "final" / "unet").is_dir():
            print(f"no candidate given: training one with `python diffusion_dpo.py --toy --output-dir {run}`")
            subprocess.run([sys.executable, str(REPO / "diffusion_dpo.py"), "--toy", "--output-dir", str(run),
                            "--overwrite"], check=True, cwd=REPO)  # replaces the debris of an interrupted training
        args = replace(args, candidates=(f"dpo={run}",))
    default_dir = REPO / "runs" / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    return replace(args, output_dir=args.output_dir or str(default_dir))


def main(args: Args) -> dict:
    args = check_args(args)
    if args.ingest_ratings:  # ---- un-blind the raters' files; no sampling, no scoring
        result = ingest_ratings(args.ingest_ratings, args.rating_key, args.confidence, args.n_resamples, args.seed)
        out = Path(args.rating_key).parent
        (out / "ratings.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "ratings.md").write_text(ratings_markdown(result))
        print(ratings_markdown(result) + f"\nwrote {out / 'ratings.json'} and {out / 'ratings.md'}")
        return result

    dist = setup_distributed()
    out = Path(args.output_dir)
    models = [Model("base", args.base_model)]
    for spec in args.candidates:
        name, sep, path = spec.partition("=")
        require(sep == "=" and re.fullmatch(r"[\w.-]+", name) is not None,
                f"--candidates {spec!r}: expected NAME=PATH, NAME of letters, digits, _ . -")
        models.append(resolve_model(name, path, args.base_model))
    names = [m.name for m in models]
    require(len(models) >= 2 and len(set(names)) == len(names), f"--candidates: unique names besides base: {names}")
    require(args.baseline in names, f"--baseline {args.baseline!r}: not one of {names}")
    prompts = load_prompts(args.prompts)[: args.max_prompts]
    n, k = len(prompts), args.images_per_prompt
    require(n >= 2, f"--prompts {args.prompts}: {n} prompt(s); the statistics need at least 2")
    others = [m for m in names if m != args.baseline]
    comparisons = [(c, args.baseline) for c in others] + list(itertools.combinations(others, 2))
    if dist.is_main:
        write_args(out, args)
        print(f"{len(models)} models x {n} prompts x {k} images = {len(models) * n * k} images ({dist.world_size} "
              f"process(es), {args.batch_size} per call); {len(comparisons)} comparisons x {len(args.scorers)} "
              f"metrics, Holm within each comparison; {args.n_resamples} bootstrap resamples per interval")
        for m in models:
            print(f"  {m.name}: {m.pipeline}" + (f" + UNet {m.unet}" if m.unet else "")
                  + (f" + LoRA {m.lora}" if m.lora else ""))

    # ---- 1. sample: the same seeds for every model; images on disk are kept (resume); ranks split the rest
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    todo = {}  # model -> this rank's missing (i, j), listed by every rank before any rank writes an image
    for model in models:
        stamp = out / "images" / model.name / "generation.json"
        record = dict(model=vars(model), seed=args.seed, steps=args.num_inference_steps, guidance=args.guidance_scale,
                      resolution=args.resolution, mixed_precision=args.mixed_precision)
        require(not stamp.exists() or json.loads(stamp.read_text()) == record,
                f"{stamp.parent}: drawn with other settings than now; use a new --output-dir")
        missing = [(i, j) for i in range(n) for j in range(k) if not image_path(out, model.name, i, j).exists()]
        todo[model] = missing[dist.rank :: dist.world_size]
        if dist.is_main and missing:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(record) + "\n")
    barrier()
    for model in [m for m in models if todo[m]]:
        pipe = load_pipeline(model, dtype, dist.device)
        for start in tqdm(range(0, len(todo[model]), args.batch_size), desc=f"sampling {model.name}",
                          disable=not dist.is_main):
            batch = todo[model][start : start + args.batch_size]
            # CPU generators: the same initial noise on any GPU or CPU, so images are comparable across machines.
            generators = [torch.Generator().manual_seed(args.seed + i + 100_000 * j) for i, j in batch]
            images = pipe([prompts[i] for i, _ in batch], num_inference_steps=args.num_inference_steps,
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
    paths = dict(spec.split("=", 1) for spec in args.scorer_paths)
    clip_paths = dict(spec.split("=", 1) for spec in args.scorer_clip_paths)
    scorers = {s: load_scorer(s, paths.get(s), clip_path=clip_paths.get(s), device=dist.device,
                              batch_size=args.batch_size) for s in args.scorers}
    embed, feature_extractor = load_embedder(args, dist.device) if args.toy or args.inception_path else (None, None)
    ref = reference_stats(args.fid_reference, embed, args.batch_size, out) if embed and args.fid_reference else None
    scores = {m: {s: np.zeros((n, k)) for s in scorers} for m in names}  # model -> metric -> (n, k)
    results = dict(n_prompts=n, images_per_prompt=k, seed=args.seed, confidence=args.confidence,
                   feature_extractor=feature_extractor, models={}, comparisons=[])
    items = [(i, j) for i in range(n) for j in range(k)]
    for model in models:
        feats, probs = [], []
        for start in tqdm(range(0, len(items), args.batch_size), desc=f"scoring {model.name}"):
            batch = items[start : start + args.batch_size]
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
            entry["is"] = inception_score(np.concatenate(probs))
        if ref is not None:
            entry["fid"], entry["kid"] = fid_kid(np.concatenate(feats), ref, args.seed)
        results["models"][model.name] = entry

    # ---- 3. compare: candidates against the baseline, then the candidates pairwise; Holm within a comparison
    for a, b in comparisons:
        metrics = {s: paired_comparison(scores[a][s], scores[b][s], args.confidence, args.n_resamples, args.seed)
                   for s in scorers}
        for test in ("p_sign", "p_wilcoxon"):
            for s, adjusted in zip(metrics, holm([metrics[s][test] for s in metrics])):
                metrics[s][test + "_holm"] = adjusted
        entry = dict(a=a, b=b, metrics=metrics)
        if ref is not None:  # FID falls with the sample count (its bias is O(1/N)): compare equal counts only
            ma, mb = results["models"][a], results["models"][b]
            assert ma["n_images"] == mb["n_images"], f"FID of {a} and {b} from different sample counts"
            entry["fid_diff"] = ma["fid"] - mb["fid"]
        results["comparisons"].append(entry)

    # ---- 4. write results.json, report.md, grid.png (rows: prompt, seed; columns: baseline | candidates), the kit
    (out / "results.json").write_text(json.dumps(dict(args=json.loads((out / "args.json").read_text()), **results),
                                                 indent=1) + "\n")
    report = report_markdown(results)
    (out / "report.md").write_text(report)
    order, rows = [args.baseline] + others, range(min(args.grid_rows, n))
    tiles = [Image.open(image_path(out, m, i, 0)).convert("RGB") for i in rows for m in order]
    side = min(tiles[0].width, 256)
    save_image_grid([t.resize((side, side)) for t in tiles], out / "grid.png", nrow=len(order),
                    captions=[f"{m}: {prompts[i]}" for i in rows for m in order], upscale=max(1, 128 // side))
    if args.rating_pairs:
        kit = export_rating_kit(out, prompts, comparisons, k, args.rating_pairs, args.seed, pixelated=side < 128)
        print(f"rating kit: send {kit / 'index.html'} to the raters, keep {kit / 'key.json'}; then run\n"
              f"  python evaluate.py --ingest-ratings <their files> --rating-key {kit / 'key.json'}")
    print(report + f"\nwrote {out / 'results.json'}, {out / 'report.md'}, {out / 'grid.png'}")
    cleanup_distributed()
    return results


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    main(parse_args())
