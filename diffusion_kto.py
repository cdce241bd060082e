"""Diffusion-KTO: fine-tune Stable Diffusion 1.5 or SDXL on per-image likes and dislikes (Li et al. 2024).

Docs (usage, logged metrics, implementation details with sources, toy results, tests): docs/diffusion_kto.md

Paper https://arxiv.org/abs/2404.04465 · official code https://github.com/jacklishufan/diffusion-kto
(train_kto_sd_v1.5.py, exps/example.sh)

Most feedback is a like or a dislike of one image, not a pair. For a caption c and ONE image x_0 (a VAE latent)
labelled desirable or undesirable, draw t ~ U{0..999} and ε ~ N(0, I), x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, and compare
the trained UNet ε_θ with the frozen reference ε_ref (the UNet we started from). Diffusion-DPO's implicit reward of
a single image, then a Kahneman-Tversky utility of it against a reference point:

    mse_θ(x) = mean_{c,h,w} ‖ε − ε_θ(x_t, t, c)‖²                        (likewise mse_ref with ε_ref)
    r(x)     = β·(mse_ref(x) − mse_θ(x))                                 the implicit reward, β·log π_θ/π_ref per step
    z_ref    = max(0, mean_batch r)    (no gradient)                     the reference point: the KL estimate
    v(x)     = λ_D·σ(r(x) − z_ref)   if x is desirable
               λ_U·σ(z_ref − r(x))   if x is undesirable                  the utility (KTO's sigmoid value function)
    L(θ)     = E_{(c, x, y), t, ε} [ λ_y − v(x) ]                        (paper Eq. 7-8, as train_kto_sd_v1.5.py)

Denoising a liked image better than the reference does, by more than the batch does on average, raises its utility;
a disliked one the other way round. z_ref is the official code's default estimate of β·KL(π_θ ‖ π_ref): the mean
implicit reward of the batch's own images, over all GPUs, detached, clamped at 0.

Paper symbol -> flag / variable:  β -> --beta / beta;  λ_D, λ_U -> --lambda-desirable, --lambda-undesirable;
z_ref (the paper's Q_ref) -> reference_point;  y (desirable or not) -> desirable;  ε_θ, ε_ref -> model_pred, ref_pred;
t, ε -> t, eps;  ᾱ_t -> noise_scheduler.alphas_cumprod;  the share of desirable images in a batch (official
--positive_ratio) -> --desirable-fraction;  images per optimizer step (8 in the official run) -> --per-device-batch ×
GPUs × --grad-accum.

Usage (the defaults are the official SD1.5 recipe of exps/example.sh: 2 images per GPU × 4 GPUs, lr 1e-7):
    torchrun --nproc_per_node 4 diffusion_kto.py                        # the official run: 8 images per step
    python diffusion_kto.py --grad-accum 4                              # one GPU, the same 8 images per step
    python diffusion_kto.py --dataset binary --dataset-source /data/lee2023   # good/bad labels (Lee et al. 2023)
    python diffusion_kto.py --dataset imagereward --lora-rank 8         # ImageRewardDB rankings, LoRA
    python diffusion_kto.py --toy                                       # the offline toy world, ~2 min on a CPU
SDXL (the family is read from the UNet's config, common/models.py; the official code has no SDXL recipe):
    python diffusion_kto.py --model stabilityai/stable-diffusion-xl-base-1.0 --vae madebyollin/sdxl-vae-fp16-fix \
        --gradient-checkpointing --grad-accum 4
    python diffusion_kto.py --toy --toy-model sdxl                      # the toy SDXL pipeline, same data
"""

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.stats
import torch
import torch.distributed as tdist
import tyro
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import Adafactor

from common import kernels
from common.data import (ImageRef, PickapicPairs, data_files, decode_image, flip_decision, has_heldout_split,
                         load_binary, load_imagereward, load_pairs, load_prompts, micro_batches, preprocess)
from common.runtime import (MetricsLogger, reference_unet, all_reduce_mean, barrier, batch_arithmetic,
                            below_base_warning, check_finite, check_model_path, check_resolution, check_resume_args,
                            cleanup_distributed, load_checkpoint, prepare_output_dir, require, save_checkpoint,
                            save_image_grid, seed_everything, set_rng_state, setup_distributed, write_args)
from common.models import (all_timesteps, ddim_sampler, encode_text_sd15, is_turbo, load_text_encoders, load_vae,
                           make_pipeline, model_family, save_final, turbo_timesteps, zero_terminal_snr)
from common.toy import toy_model_in, toy_reward, toy_sdxl_pipeline, toy_world

HUB_SOURCES = {"pickapic": "yuvalkirstain/pickapic_v2", "imagereward": "THUDM/ImageRewardDB"}
OFFICIAL_IMAGES_PER_STEP = 8  # exps/example.sh: --train_batch_size 2 × --num_processes 4 × accumulation 1


@dataclasses.dataclass
class Args:
    toy: bool = False
    """run on the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""
    toy_model: Literal["sd15", "sdxl"] = "sd15"
    """--toy: the SD1.5-shaped toy pipeline, or the SDXL-shaped one (built on first use; the same toy data)"""
    output_dir: str | None = None
    """args.json, metrics.jsonl, tb/, checkpoints/, samples/, final/, eval.json (None: runs/diffusion_kto-<time>)"""
    seed: int = 0
    """seeds the draws of images, flips, t, ε, prompt dropout (the same stream on every GPU: see draw_noise), LoRA init"""
    resume: bool = False
    """continue exactly from <output-dir>/checkpoints/latest: data order, RNG streams, optimizer, LR schedule"""
    overwrite: bool = False
    """start afresh in a non-empty --output-dir, deleting the previous run's outputs (refused without this flag)"""
    stop_at_step: int | None = None
    """checkpoint and exit after this step, as a preempted job would; run again with --resume to continue"""

    # Model and data
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local folder of an SD1.5 or SDXL pipeline (SDXL if its UNet has addition_embed_type "text_time";
    sdxl-turbo if the name contains "turbo": t ∈ {249, 499, 749, 999}, as diffusion_dpo.py)"""
    vae: str | None = None
    """hub id or folder of a VAE replacing the pipeline's (SDXL in fp16: madebyollin/sdxl-vae-fp16-fix)"""
    dataset: Literal["pickapic", "imagereward", "binary"] = "pickapic"
    """labelled images: Pick-a-Pic v2 pairs split into desirable and undesirable images (the paper), ImageRewardDB
    rankings split the same way, or Lee et al.'s binary good/bad labels (no default source: --dataset-source)"""
    dataset_source: str | None = None
    """hub id, parquet file or folder in that layout (None: yuvalkirstain/pickapic_v2 or THUDM/ImageRewardDB)"""
    split: str = "train"
    """training split; Pick-a-Pic ties (0.5/0.5) and ImageRewardDB tied ranks compare nothing and are dropped"""
    eval_split: str = "validation"
    """held-out split for the final implicit-reward check; a single parquet file has none (skipped, with a message)"""
    max_broken_fraction: float = 0.01
    """rows with unusable labels (null, non-numeric, out of range) are skipped and counted up to this fraction of a
    split; above it the run stops, naming the column (common/data.py)"""
    intersections: Literal["desirable", "undesirable", "drop"] = "desirable"
    """pickapic, imagereward: an image preferred in one comparison and rejected in another (official --policy
    gt_label_wi_l, the default: desirable; gt_label_w_il: undesirable; gt_label_w_l: dropped)"""
    max_images: int | None = None
    """train on the first N labelled images only (None: all)"""
    eval_images: int | None = 500
    """held-out labelled images to evaluate (None: all)"""
    resolution: int | None = None
    """images are resized (shorter side, bilinear) and centre-cropped to this (None: 512; SDXL base 1024)"""
    random_flip: bool = True
    """flip each drawn image horizontally with p=0.5 (official: always on, its --no_hflip is parsed but unused)"""
    prompt_dropout: float | None = None
    """probability that an image's caption is replaced by "" (None: official --proportion_empty_prompts 0.2; turbo 0)"""
    num_workers: int = 8
    """DataLoader processes per GPU decoding images"""

    # The method
    beta: float = 1000.0
    """β, the scale of the implicit reward (official --beta_dpo 1000; no ½ in front, unlike diffusion_dpo.py's β)"""
    lambda_desirable: float = 1.0
    """λ_D, the weight of a desirable image's loss (official --lambda_d_kto 1)"""
    lambda_undesirable: float = 1.0
    """λ_U, the weight of an undesirable image's loss (official --lambda_u_kto 1)"""
    desirable_fraction: float | None = 0.8
    """chance that a drawn image is a desirable one (official WeightedRandomSampler, --positive_ratio 0.8 in
    exps/example.sh, its parser default 0.5); None: epochs over the data in its own proportions"""
    lora_rank: int = 0
    """0: full UNet fine-tune (exps/example.sh passes no --use_lora); N > 0: LoRA of rank N, reference = adapters off"""

    # Optimisation
    steps: int = 20000
    """optimizer steps (exps/example.sh --max_train_steps 20000)"""
    per_device_batch: int = 2
    """images per GPU per forward pass (exps/example.sh --train_batch_size 2, on 4 GPUs)"""
    grad_accum: int = 1
    """micro-batches per optimizer step: images per step = per-device batch × GPUs × grad-accum (official: 8)"""
    learning_rate: float = 1e-7
    """learning rate (exps/example.sh 1e-7; per image instead with --scale-lr)"""
    scale_lr: bool = False
    """multiply --learning-rate by the images per optimizer step (official --scale_lr, off in exps/example.sh)"""
    warmup_steps: int = 200
    """optimizer steps of linear warm-up from 0, then constant (exps/example.sh constant_with_warmup, 200)"""
    optimizer: Literal["adamw", "adafactor"] | None = None
    """None: AdamW (SD1.5; official 8-bit AdamW, same settings), Adafactor (SDXL, to fit memory, as diffusion_dpo.py)"""
    adam_beta1: float = 0.9
    """AdamW β1 (official)"""
    adam_beta2: float = 0.999
    """AdamW β2 (official)"""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay (official)"""
    adam_eps: float = 1e-8
    """AdamW ε (official)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (official --max_grad_norm, and its DeepSpeed config)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """autocast dtype over fp32 trained weights; the frozen VAE, text encoder and reference are stored in it"""
    gradient_checkpointing: bool = False
    """recompute UNet activations in the backward pass: less memory, slower (exps/example.sh: on)"""
    compile: bool = False
    """torch.compile the loss's MSE kernel (common/kernels.py stream_mse); eager is the reference"""
    compile_unet: bool = False
    """torch.compile the trained UNet as well"""

    # Logging, checkpoints, evaluation
    log_every: int = 10
    """write metrics every N optimizer steps (and at step 1, where θ = ref and the loss is (λ_D·n_D + λ_U·n_U)/2n)"""
    checkpoint_every: int = 5000
    """save a resumable checkpoint every N steps (exps/example.sh --checkpointing_steps 5000)"""
    sample_every: int = 500
    """save a grid of fixed-seed samples every N steps (and before the first)"""
    validation_prompts: str | None = None
    """prompt set for the sample grids and, with --toy, eval.json's toy-reward check (common.data.load_prompts; None:
    the first captions of --eval-split, and the toy world's prompts for the check)"""
    num_validation_prompts: int = 8
    """prompts in the sample grid, prompt i always with seed i"""
    sample_steps: int = 50
    """DDIM steps for the sample grids"""
    guidance_scale: float = 7.5
    """classifier-free guidance for the sample grids"""
    eval_draws: int = 1
    """(t, ε) draws per held-out image; each image's implicit reward is averaged over them"""
    reward_seeds: int = 4
    """toy only: samples per toy prompt for the base-vs-final toy-reward test (0: skip)"""


def toy_defaults(toy_model: str = "sd15") -> Args:
    """--toy: the toy world's model and data (Pick-a-Pic pairs split into liked and disliked images), and a recipe
    that shows the effect in about two minutes on 2 CPU cores: as many images per step as diffusion_dpo.py --toy."""
    world = toy_world()
    return Args(
        toy=True, toy_model=toy_model, model=str(world.pipeline if toy_model == "sd15" else toy_sdxl_pipeline()),
        resolution=world.resolution, mixed_precision="no", num_workers=0,
        steps=120, per_device_batch=32, grad_accum=1, learning_rate=5e-6, warmup_steps=10,
        log_every=5, checkpoint_every=60, sample_every=60, eval_images=None, eval_draws=8,
        validation_prompts=str(world.prompts), num_validation_prompts=24, sample_steps=20, guidance_scale=5.0,
    )


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--toy" in argv:
        return tyro.cli(Args, args=argv, default=toy_defaults(toy_model_in(argv)))
    return tyro.cli(Args, args=argv)


# ------------------------------------------------------------------------------------------- the algorithm
def diffusion_kto_loss(model_pred, ref_pred, target, desirable, beta: float, lambda_desirable: float = 1.0,
                       lambda_undesirable: float = 1.0, batch_mean: Callable = torch.mean, compile: bool = False):
    """Diffusion-KTO loss (paper Eq. 7-8, as the official train_kto_sd_v1.5.py computes it, --loss kto --halo
    sigmoid --bce_offset none), on common.kernels.stream_mse.

    model_pred, ref_pred, target: (B, C, H, W), one row per image; target is the noise ε. desirable: (B,) bool.
        mse(x)  = mean_{c,h,w} (ε_pred − ε)²                                  in float32
        r(x)    = β·(mse_ref(x) − mse_θ(x))                                  the implicit reward
        z_ref   = max(0, batch_mean(r)), detached                            the reference point (KL estimate)
        v(x)    = λ_D·σ(r − z_ref) (desirable),  λ_U·σ(z_ref − r) (undesirable)
        loss    = mean_x (λ_y − v(x));    implicit accuracy = mean(±(r − z_ref) > 0), + for desirable
    `batch_mean` makes z_ref the mean over the GLOBAL batch: under DDP pass the all-reduced mean (the official
    accelerator.reduce(..., "mean")). At θ = ref, r = z_ref = 0, v = λ_y/2 and the loss is mean_x λ_y / 2.

    Scale of β: the official code multiplies (ref_loss − model_loss) by --beta_dpo = 1000, no ½: β = 1000 here is
    diffusion_dpo.py's β = 2000. Returns (loss, r (B,), reference_point (0-dim), metrics: dict of detached sums).
    """
    mse = kernels.compiled(kernels.stream_mse, enabled=compile)(torch.stack([model_pred, ref_pred]), target)  # (2, B)
    mse_model, mse_ref = mse[0], mse[1]  # (B,), (B,)
    reward = beta * (mse_ref - mse_model)  # (B,)
    reference_point = batch_mean(reward.detach()).clamp(min=0)  # 0-dim; no gradient flows through the KL estimate
    sign = desirable.to(reward.dtype) * 2 - 1  # (B,): +1 desirable, −1 undesirable
    weight = torch.where(desirable, reward.new_tensor(lambda_desirable), reward.new_tensor(lambda_undesirable))  # λ_y
    loss = (weight * (1 - torch.sigmoid(sign * (reward - reference_point)))).mean()  # λ_y − v(x)
    d, u = desirable.float(), (~desirable).float()
    r = reward.detach().float()
    metrics = {  # sums and counts, so that means over micro-batches and GPUs weigh every image once
        "n": torch.tensor(float(len(r))), "n_desirable": d.sum(), "n_undesirable": u.sum(),
        "correct": ((sign * (reward.detach() - reference_point)) > 0).float().sum(),
        "reward_desirable": (r * d).sum(), "reward_undesirable": (r * u).sum(), "reward": r.sum(),
        "mse_model": mse_model.detach().float().sum(), "mse_ref": mse_ref.detach().float().sum(),
    }
    return loss, reward, reference_point, metrics


def draw_noise(gen: torch.Generator, num_images: int, latent_shape, prompt_dropout: float, num_timesteps: int):
    """One micro-step's randomness for the GLOBAL micro-batch (all GPUs): t (G,), ε (G, C, h, w), the posterior's
    standard-normal draw z (G, C, h, w) and the prompt-dropout mask (G,), one of each per image (official: one t and
    one ε per image). Every rank draws the same numbers and keeps its own rows: N GPUs train as one process does."""
    t = torch.randint(0, num_timesteps, (num_images,), generator=gen)
    eps = torch.randn((num_images, *latent_shape), generator=gen)
    z = torch.randn((num_images, *latent_shape), generator=gen)
    drop = torch.rand(num_images, generator=gen) < prompt_dropout
    return t, eps, z, drop


def noisy_latents(moments, t, eps, z, noise_scheduler, scaling_factor: float):
    """x_t of B images: moments (B, 2C, h, w) the VAE posterior's (mean, log-variance); t (B,); eps, z (B, C, h, w)."""
    posterior = DiagonalGaussianDistribution(moments)
    x_0 = ((posterior.mean + posterior.std * z.to(moments.dtype)) * scaling_factor).float()  # latent_dist.sample()
    return noise_scheduler.add_noise(x_0, eps, t)  # x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε


def text_embeddings(captions, drop, tokenizers, text_encoders, encode_text=encode_text_sd15):
    """The text conditioning of B images, captions in `drop` replaced by "" before encoding: SD1.5 (B, 77, D); SDXL
    (hidden (B, 77, D1 + D2), pooled (B, P)) (common/models.py)."""
    with torch.no_grad():
        return encode_text(["" if d else c for c, d in zip(captions, drop.tolist())], tokenizers, text_encoders)


# ------------------------------------------------------------------------------------------- data: labelled images
def per_image_labels(keys_w: Sequence, keys_l: Sequence, intersections: str) -> tuple[np.ndarray, np.ndarray]:
    """Comparisons -> labelled images, as the paper splits Pick-a-Pic v2 (official train_processed_v3.csv: every
    image is `exclusive_win`, `exclusive_lose` or `intersections`). keys_w[i], keys_l[i]: the identities of the
    preferred and the rejected image of comparison i. An image that only wins is desirable, one that only loses
    undesirable, one that does both goes where `intersections` says (desirable, undesirable, or dropped).
    Returns (first (M,): the position in keys_w + keys_l where each kept image first appears, in the order of the
    comparisons; desirable (M,) bool)."""
    won, lost, first, n = set(keys_w), set(keys_l), {}, len(keys_w)
    for i in range(n):  # in the order of the comparisons, so that --max-images keeps both labels
        first.setdefault(keys_w[i], i)
        first.setdefault(keys_l[i], n + i)
    keep, desirable = [], []
    for key, position in first.items():
        both = key in won and key in lost
        if both and intersections == "drop":
            continue
        keep.append(position)
        desirable.append(intersections == "desirable" if both else key in won)
    return np.array(keep, dtype=np.int64), np.array(desirable, dtype=bool)


def _pair_image(pairs, position: int) -> tuple[str, ImageRef]:
    """Image `position` of `pairs` counted winners first (0..N-1), then losers (N..2N-1)."""
    pair = pairs[position % len(pairs)]
    return pair.caption, pair.image_w if position < len(pairs) else pair.image_l


def _row_image(rows, text: str, i: int) -> tuple[str, ImageRef]:
    row = rows[i]
    return row[text], row["image"]


@dataclasses.dataclass
class LabelledImages:
    """get(i) -> (caption, image as stored); desirable (N,) bool. Images stay encoded until a batch needs them."""
    get: Callable[[int], tuple[str, ImageRef]]
    desirable: np.ndarray

    def __len__(self) -> int:
        return len(self.desirable)


def pickapic_uids(source: str, split: str, pairs: PickapicPairs) -> tuple[list, list] | None:
    """The image_0_uid / image_1_uid of each kept pair, winner first (Pick-a-Pic v2 has them; an image can be in
    several pairs), or None if the copy lacks the columns."""
    columns = ["image_0_uid", "image_1_uid"]
    if not Path(source).exists():  # a hub id: the dataset load_pickapic has just cached
        ds = datasets.load_dataset(source, split=split)
        if not set(columns) <= set(ds.column_names):
            return None
        table = ds.select_columns(columns).data.table
    else:
        files = data_files("pickapic", source, split)
        if not all(set(columns) <= set(pq.read_schema(f).names) for f in files):
            return None
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])  # load_pickapic's row order
    uid_0 = np.asarray(table.column("image_0_uid").to_pylist(), dtype=object)[pairs.rows]
    uid_1 = np.asarray(table.column("image_1_uid").to_pylist(), dtype=object)[pairs.rows]
    return np.where(pairs.swap, uid_1, uid_0).tolist(), np.where(pairs.swap, uid_0, uid_1).tolist()


def load_labelled(dataset: str, source: str, split: str, intersections: str, max_images: int | None,
                  max_broken: float) -> LabelledImages:
    """Labelled images of a split. pickapic: the non-tie pairs' images, one per image_*_uid (one per pair side if
    the copy has no uid columns), split by per_image_labels; imagereward: every prompt's images compared pairwise
    by rank, split the same way; binary: Lee et al.'s label 1 = desirable, 0 = undesirable."""
    if dataset == "binary":
        ds = load_binary(source, split, max_broken=max_broken)
        keep = np.arange(len(ds))[:max_images]
        desirable = np.asarray(ds["label"])[keep] == 1
        return LabelledImages(functools.partial(_row_image, ds, "prompt"), desirable)
    if dataset == "pickapic":
        pairs = load_pairs("pickapic", source, split, max_broken=max_broken)  # ties dropped, winner first
        uids = pickapic_uids(source, split, pairs)
        if uids is None:
            logging.warning("%s (split %s) has no image_0_uid/image_1_uid columns: each pair's two images count as "
                            "two distinct images", source, split)
            uids = list(range(len(pairs))), list(range(len(pairs), 2 * len(pairs)))
        first, desirable = per_image_labels(*uids, intersections)
        get = lambda k, pairs=pairs, first=first: _pair_image(pairs, int(first[k]))  # noqa: E731
    else:
        rows = load_imagereward(source, split, max_broken=max_broken)
        by_prompt: dict = {}
        for i, row in enumerate(rows):
            by_prompt.setdefault(row["prompt_id"], []).append(i)
        keys_w, keys_l = [], []
        for group in by_prompt.values():  # every i < j of a prompt with different ranks, as common.data does
            for a_pos, a in enumerate(group):
                for b in group[a_pos + 1:]:
                    if rows[a]["rank"] != rows[b]["rank"]:
                        w, l = (a, b) if rows[a]["rank"] < rows[b]["rank"] else (b, a)
                        keys_w.append(w)
                        keys_l.append(l)
        first, desirable = per_image_labels(keys_w, keys_l, intersections)
        index = np.array([*keys_w, *keys_l], dtype=np.int64)[first]
        get = lambda k, rows=rows, index=index: _row_image(rows, "prompt", int(index[k]))  # noqa: E731
    return LabelledImages(get, desirable[:max_images])


def labelled_micro_batches(desirable: np.ndarray, per_device: int, rank: int, world_size: int, seed: int,
                           start: int, desirable_fraction: float | None):
    """This rank's [(draw, index), ...] for every micro-step from `start` on. With a desirable_fraction p, each image
    of a global micro-batch is desirable with probability p and then uniform within its class, with replacement
    (the official WeightedRandomSampler); a function of (seed, micro-step) alone, so --resume needs no sampler
    state. `draw` numbers every drawn image, for its flip. None: epochs of common.data.micro_batches."""
    if desirable_fraction is None:
        yield from micro_batches(len(desirable), per_device, rank, world_size, seed, start)
        return
    classes = [np.flatnonzero(~desirable), np.flatnonzero(desirable)]
    size = per_device * world_size
    k = start
    while True:
        rng = np.random.default_rng([seed, k])
        liked = rng.random(size) < desirable_fraction
        index = [int(classes[c][rng.integers(len(classes[c]))]) for c in liked.astype(int)]
        mine = slice(rank * per_device, (rank + 1) * per_device)
        yield [(k * size + j, i) for j, i in list(enumerate(index))[mine]]
        k += 1


class LabelledDataset(torch.utils.data.Dataset):
    """(draw, index) -> {pixels (3, R, R) in [-1, 1], caption, desirable, skipped}, flipped by a hash of (seed,
    draw). An image that does not decode is replaced by the next good one OF THE SAME LABEL (counted in `skipped`),
    so every rank's micro-batch stays full (an empty one would hang DDP) and the label mix stays as drawn."""

    def __init__(self, images: LabelledImages, resolution: int, random_flip: bool, seed: int):
        self.images, self.resolution, self.random_flip, self.seed = images, resolution, random_flip, seed
        self.classes = {label: np.flatnonzero(images.desirable == label) for label in (False, True)}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        draw, index = key
        label = bool(self.images.desirable[index])
        same = self.classes[label]
        start = int(np.searchsorted(same, index))
        for skipped in range(len(same)):
            i = int(same[(start + skipped) % len(same)])
            caption, image = self.images.get(i)
            try:
                image = decode_image(image)
            except Exception as e:  # any data error skips the image, logged and counted, never fatal
                logging.warning("image %d: does not decode, skipped (%s: %s)", i, type(e).__name__, e)
                continue
            flip = self.random_flip and flip_decision(self.seed, draw, "x")
            return {"pixels": preprocess(image, self.resolution, flip), "caption": caption, "desirable": label,
                    "skipped": skipped}
        raise RuntimeError(f"no {'desirable' if label else 'undesirable'} image in the data set decodes")


def collate(items: list[dict]) -> dict:
    return {"pixels": torch.stack([it["pixels"] for it in items]), "caption": [it["caption"] for it in items],
            "desirable": torch.tensor([it["desirable"] for it in items]), "skipped": sum(it["skipped"] for it in items)}


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], args: Args, autocast) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], prompt i drawn with generator seed i, so runs and methods compare sample by
    sample."""
    images = []
    for k in range(0, len(prompts), 32):
        with autocast():
            images.append(pipe(prompts[k:k + 32], generator=[torch.Generator().manual_seed(s) for s in seeds[k:k + 32]],
                               num_inference_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                               height=args.resolution, width=args.resolution, output_type="pt").images.float().cpu())
    return torch.cat(images)


@torch.no_grad()
def heldout_eval(unet, ref_unet, images: LabelledImages, vae, tokenizers, text_encoders, family, timesteps,
                 noise_scheduler, args: Args, autocast) -> dict:
    """The implicit reward r(x) of held-out labelled images, each averaged over --eval-draws (t, ε) draws fixed by
    seed 0 (the same for every run): AUC = P(r(desirable) > r(undesirable)) over every desirable × undesirable
    couple (ties 1/2; chance 0.5), and the label accuracy against the reference point of the held-out set."""
    gen, rewards = torch.Generator().manual_seed(0), []
    data = LabelledDataset(images, args.resolution, random_flip=False, seed=0)
    keys = [(i, i) for i in range(len(images))]
    for batch in DataLoader(data, batch_sampler=[keys[k:k + 4 * args.per_device_batch] for k in
                                                 range(0, len(keys), 4 * args.per_device_batch)], collate_fn=collate):
        moments = vae.encode(batch["pixels"].to(vae.device, vae.dtype)).latent_dist.parameters  # (B, 2C, h, w)
        num = len(batch["caption"])
        text = text_embeddings(batch["caption"], torch.zeros(num, dtype=torch.bool), tokenizers, text_encoders,
                               family.encode_text)
        inputs = family.unet_inputs(text, args.resolution)
        reward = torch.zeros(num)
        for _ in range(args.eval_draws):
            t, eps, z, _ = draw_noise(gen, num, (moments.shape[1] // 2, *moments.shape[2:]), 0.0,
                                      noise_scheduler.config.num_train_timesteps)
            t, eps = timesteps(t).to(vae.device), eps.to(vae.device)
            x_t = noisy_latents(moments, t, eps, z.to(vae.device), noise_scheduler, vae.config.scaling_factor)
            with autocast():
                model_pred = unet(x_t, t, **inputs).sample
                with reference_unet(unet, ref_unet) as ref:
                    ref_pred = ref(x_t, t, **inputs).sample
            reward += diffusion_kto_loss(model_pred, ref_pred, eps, batch["desirable"].to(vae.device),
                                         args.beta)[1].float().cpu() / args.eval_draws
        rewards.append(reward)
    reward, desirable = torch.cat(rewards), torch.as_tensor(images.desirable)
    r_d, r_u = reward[desirable], reward[~desirable]
    auc = ((r_d[:, None] > r_u[None]).float() + 0.5 * (r_d[:, None] == r_u[None]).float()).mean().item() \
        if len(r_d) and len(r_u) else float("nan")
    z_ref = reward.mean().clamp(min=0)
    return {"eval/auc": auc, "eval/implicit_acc": ((reward > z_ref) == desirable).float().mean().item(),
            "eval/reward_desirable": r_d.mean().item(), "eval/reward_undesirable": r_u.mean().item(),
            "eval/images": len(reward), "eval/desirable_images": len(r_d)}


# ------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    dist = setup_distributed()
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(message)s")
    require(args.dataset != "binary" or args.dataset_source is not None or args.toy,
            "--dataset binary has no hub default: pass --dataset-source (a folder of {train,validation}.parquet with "
            "prompt, image, label)")
    source = args.dataset_source or (str(getattr(toy_world(), args.dataset)) if args.toy else HUB_SOURCES[args.dataset])
    out = [args.output_dir or f"runs/diffusion_kto-{time.strftime('%Y%m%d-%H%M%S')}"]
    if dist.world_size > 1:
        tdist.broadcast_object_list(out, src=0)  # one timestamped folder for all ranks
    out = Path(out[0])
    check_model_path(args.model, "--model")  # before the data loads: a mistyped path fails in a second
    family, turbo = model_family(args.model), is_turbo(args.model)  # common/models.py: SD1.5 or SDXL, chosen once
    timesteps = turbo_timesteps if turbo else all_timesteps
    sdxl_base = family.name == "sdxl" and not turbo
    args = dataclasses.replace(  # the None defaults: the recipe of this model family
        args, resolution=args.resolution or (1024 if sdxl_base else 512),
        prompt_dropout=(0.0 if turbo else 0.2) if args.prompt_dropout is None else args.prompt_dropout,
        optimizer=args.optimizer or ("adafactor" if family.name == "sdxl" else "adamw"))
    check_resolution(args.model, args.resolution)
    require(0 <= args.max_broken_fraction < 1,
            f"--max-broken-fraction must be in [0, 1), got {args.max_broken_fraction}")
    require(args.beta > 0, f"--beta must be > 0, got {args.beta}")
    require(args.lambda_desirable > 0 and args.lambda_undesirable > 0, "--lambda-desirable and --lambda-undesirable "
            f"must be > 0, got {args.lambda_desirable}, {args.lambda_undesirable}")
    require(args.desirable_fraction is None or 0 < args.desirable_fraction < 1,
            f"--desirable-fraction must be in (0, 1) or None, got {args.desirable_fraction}")
    require(args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}")
    require(0 <= args.prompt_dropout < 1, f"--prompt-dropout must be in [0, 1), got {args.prompt_dropout}")
    require(args.steps >= 1 and args.lora_rank >= 0 and args.eval_draws >= 1, "--steps, --eval-draws must be >= 1 "
            f"and --lora-rank >= 0: got {args.steps}, {args.eval_draws}, {args.lora_rank}")
    require(min(args.log_every, args.checkpoint_every, args.sample_every) >= 1,
            "--log-every, --checkpoint-every and --sample-every must be >= 1")
    require(args.mixed_precision != "fp16" or dist.device.type == "cuda", "--mixed-precision fp16 needs a GPU")
    require(not args.resume or args.output_dir is not None, "--resume needs the --output-dir of the run to continue")
    prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, is_main=dist.is_main)
    images_per_step = batch_arithmetic(args.per_device_batch, dist.world_size, args.grad_accum)
    lr = args.learning_rate * (images_per_step if args.scale_lr else 1)
    seed_everything(args.seed, dist.rank)

    # ---- data: labelled images (per_image_labels), and the held-out split's for the final check
    images = load_labelled(args.dataset, source, args.split, args.intersections, args.max_images,
                           args.max_broken_fraction)
    eval_images = None  # a single parquet file is one split: a "held-out" check on it would reuse the training rows
    if has_heldout_split(source):
        eval_images = load_labelled(args.dataset, source, args.eval_split, args.intersections, args.eval_images,
                                    args.max_broken_fraction)
    elif dist.is_main:
        print(f"--dataset-source {source} is a single parquet file, so it has no held-out split: the held-out "
              f"evaluation is skipped (point to a folder with {args.split} and {args.eval_split} splits to run it)")
    micro = args.per_device_batch * dist.world_size  # images per micro-step, all GPUs together
    n_desirable = int(images.desirable.sum())
    require(len(images) >= micro, f"{len(images)} training images cannot fill one micro-batch of {micro} images "
            f"(--per-device-batch {args.per_device_batch} × {dist.world_size} GPUs)")
    require(args.desirable_fraction is None or 0 < n_desirable < len(images), f"--desirable-fraction "
            f"{args.desirable_fraction} draws from both classes, but {args.dataset} {args.split} has {n_desirable} "
            f"desirable images of {len(images)}: pass --desirable-fraction None")
    if dist.is_main:
        print(f"model: {family.pipeline_class.__name__} ({'turbo: t in 250·(t mod 4) + 249, ' if turbo else ''}"
              f"{args.resolution} px, prompt dropout {args.prompt_dropout:g}, {args.optimizer}, "
              f"{args.warmup_steps} warm-up steps)")
        print(f"{args.dataset} {args.split}: {len(images):,} labelled images, {n_desirable:,} desirable and "
              f"{len(images) - n_desirable:,} undesirable (intersections: {args.intersections}); drawn "
              + (f"{args.desirable_fraction:.0%} desirable" if args.desirable_fraction else "in epochs"))
        print(f"images per optimizer step = {args.per_device_batch} per GPU × {dist.world_size} GPUs × "
              f"{args.grad_accum} accumulation = {images_per_step}; learning rate = {args.learning_rate:g}"
              + (f" × {images_per_step} = {lr:g}" if args.scale_lr else ""))
        print(f"{args.steps} steps × {images_per_step} = {args.steps * images_per_step:,} images = "
              f"{args.steps * images_per_step / len(images):.2f} passes over the data; "
              f"{len(eval_images) if eval_images else 0} held-out images ({args.eval_split})")
        if family.name == "sdxl" and args.mixed_precision == "fp16" and args.vae is None:
            print("WARNING: SDXL's own VAE overflows in fp16 (NaN latents): pass --vae madebyollin/sdxl-vae-fp16-fix")
        if not args.toy and images_per_step != OFFICIAL_IMAGES_PER_STEP:
            print(f"WARNING: {images_per_step} images per step, the official run used {OFFICIAL_IMAGES_PER_STEP} "
                  f"(2 per GPU × 4 GPUs): change --grad-accum or --per-device-batch to match")

    # ---- models: trained UNet in fp32 (autocast), everything frozen stored in the autocast dtype (official)
    device = dist.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    autocast = functools.partial(torch.autocast, device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no")
    tokenizers, text_encoders = load_text_encoders(args.model, family, device, weight_dtype)
    vae = load_vae(args.model, args.vae, device, weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")  # SD1.5: scaled_linear, 1000
    if turbo:  # as diffusion_dpo.py: turbo trains on a zero-terminal-SNR schedule (common.models.zero_terminal_snr)
        noise_scheduler.alphas_cumprod = zero_terminal_snr(noise_scheduler.alphas_cumprod)
    require(noise_scheduler.config.prediction_type == "epsilon", "the model must predict epsilon, as SD1.5 and SDXL do")
    side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, side, side)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device)
    if args.lora_rank:  # official LoRA settings: frozen base in the autocast dtype, adapters in fp32
        unet.requires_grad_(False).to(dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        cast_training_params(unet, dtype=torch.float32)
        ref_unet = None
    else:
        ref_unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device, weight_dtype)
        ref_unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    if args.optimizer == "adafactor":  # diffusion_dpo.py's SDXL optimizer: factored second moments, to fit memory
        optimizer = Adafactor(params, lr=lr, weight_decay=args.weight_decay, clip_threshold=1.0, scale_parameter=False,
                              relative_step=False)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.weight_decay, eps=args.adam_eps)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")  # fp16 needs loss scaling
    gen = torch.Generator().manual_seed(args.seed)  # the loop's only random stream: t, ε, z, prompt dropout
    weights_name = "unet_lora" if args.lora_rank else "unet"

    start, skipped_total = 0, 0  # images replaced because they did not decode, over the whole run
    if args.resume:
        start, weights, extra = load_checkpoint(out, script="diffusion_kto.py")
        check_resume_args(extra["args"], args)
        skipped_total = extra.get("skipped_images_total", 0)
        require(len(extra["rng"]) == dist.world_size, f"the checkpoint was written by {len(extra['rng'])} "
                f"processes; resume with as many (this run has {dist.world_size})")
        require(weights_name in weights, f"the checkpoint holds {list(weights)}, not {weights_name}: resume with "
                f"the --lora-rank it was trained with ({extra['args']['lora_rank']})")
        if args.lora_rank:
            unexpected = set_peft_model_state_dict(unet, weights[weights_name]).unexpected_keys
            require(not unexpected, f"LoRA weights that fit no layer of this UNet: {unexpected[:3]}")
        else:
            unet.load_state_dict(weights[weights_name])
        optimizer.load_state_dict(extra["optimizer"])
        lr_scheduler.load_state_dict(extra["lr_scheduler"])
        scaler.load_state_dict(extra["scaler"])
        set_rng_state(extra["rng"][dist.rank], generators=[gen])
        if dist.is_main:
            print(f"resumed from step {start} of {out}")
    model = DDP(unet, device_ids=[device.index] if device.type == "cuda" else None) if dist.world_size > 1 else unet
    model = torch.compile(model) if args.compile_unet else model
    if dist.is_main:
        write_args(out, args)
    logger = MetricsLogger(out, enabled=dist.is_main, resume_step=start if args.resume else None)

    keys = labelled_micro_batches(images.desirable, args.per_device_batch, dist.rank, dist.world_size, args.seed,
                                  start * args.grad_accum, args.desirable_fraction)
    loader = iter(DataLoader(LabelledDataset(images, args.resolution, args.random_flip, args.seed), batch_sampler=keys,
                             collate_fn=collate, num_workers=args.num_workers))
    rows = slice(dist.rank * args.per_device_batch, (dist.rank + 1) * args.per_device_batch)  # this rank's images
    global_mean = lambda x: all_reduce_mean(x.mean(), dist)  # noqa: E731  the reference point over every GPU

    make_pipe = functools.partial(make_pipeline, family, args.model, vae=vae, tokenizers=tokenizers,
                                  text_encoders=text_encoders, scheduler=ddim_sampler(noise_scheduler.config))
    if args.validation_prompts:
        grid_prompts = load_prompts(args.validation_prompts)[:args.num_validation_prompts]
    else:
        shown = eval_images or images  # the training captions when there is no held-out split
        grid_prompts = list(dict.fromkeys(shown.get(i)[0] for i in range(min(len(shown), 1000))))
        grid_prompts = grid_prompts[:args.num_validation_prompts]

    def sample_grid(step: int) -> None:  # rank 0 only: fixed-seed samples of the current UNet
        unet.eval()
        pipe = make_pipe(unet=unet)
        pipe.set_progress_bar_config(disable=True)
        samples = generate(pipe, grid_prompts, list(range(len(grid_prompts))), args, autocast)
        grid = save_image_grid(samples, out / "samples" / f"step_{step:07d}.png", nrow=8, captions=grid_prompts,
                               upscale=max(1, 128 // args.resolution))
        logger.log_images("samples", grid, step)
        unet.train()

    if dist.is_main and start == 0 and grid_prompts:
        sample_grid(0)  # the base model, for comparison
    barrier()

    # ---- training loop: the algorithm
    unet.train()
    progress = tqdm(initial=start, total=args.steps, disable=not dist.is_main)
    clock, images_since, step = time.time(), 0, start
    for step in range(start + 1, args.steps + 1):
        totals = {}
        for micro_step in range(args.grad_accum):
            batch = next(loader)
            pixels = batch["pixels"].to(device, weight_dtype)  # (B, 3, R, R)
            with torch.no_grad():
                moments = vae.encode(pixels).latent_dist.parameters  # (B, 2C, h, w)
            t, eps, z, drop = draw_noise(gen, micro, latent_shape, args.prompt_dropout,
                                         noise_scheduler.config.num_train_timesteps)
            t, eps = timesteps(t[rows]).to(device), eps[rows].to(device)
            x_t = noisy_latents(moments, t, eps, z[rows].to(device), noise_scheduler, vae.config.scaling_factor)
            text = text_embeddings(batch["caption"], drop[rows], tokenizers, text_encoders, family.encode_text)
            inputs = family.unet_inputs(text, args.resolution)  # encoder_hidden_states (B, 77, D) [, SDXL's added]
            desirable = batch["desirable"].to(device)  # (B,)
            last = micro_step == args.grad_accum - 1
            with model.no_sync() if dist.world_size > 1 and not last else contextlib.nullcontext():
                with autocast():
                    model_pred = model(x_t, t, **inputs).sample  # (B, 4, h, w)
                    with torch.no_grad(), reference_unet(unet, ref_unet) as ref:
                        ref_pred = ref(x_t, t, **inputs).sample  # (B, 4, h, w)
                loss, _, reference_point, sums = diffusion_kto_loss(
                    model_pred, ref_pred, eps, desirable, args.beta, args.lambda_desirable, args.lambda_undesirable,
                    batch_mean=global_mean, compile=args.compile)
                scaler.scale(loss / args.grad_accum).backward()
            for name, value in {"loss": loss.detach(), "reference_point": reference_point, **sums,
                                "skipped": batch["skipped"]}.items():
                totals[name] = totals.get(name, 0) + torch.as_tensor(value, dtype=torch.float32) / args.grad_accum
        stats = dict(zip(totals, all_reduce_mean(torch.stack([v.to(device) for v in totals.values()]), dist)))
        check_finite(stats["loss"], step, out)  # before the update: the last checkpoint stays the last good one
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr_now = lr_scheduler.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        images_since += images_per_step
        skipped_total += round(stats["skipped"].item() * args.grad_accum * dist.world_size)  # every step

        if step % args.log_every == 0 or step == 1:
            s = {k: v.item() for k, v in stats.items()}
            row = {"losses/loss": s["loss"], "losses/implicit_acc": s["correct"] / s["n"],
                   "losses/mse_model": s["mse_model"] / s["n"], "losses/mse_ref": s["mse_ref"] / s["n"],
                   "rewards/reference_point": s["reference_point"], "rewards/mean": s["reward"] / s["n"],
                   "rewards/desirable": s["reward_desirable"] / s["n_desirable"] if s["n_desirable"] else math.nan,
                   "rewards/undesirable": s["reward_undesirable"] / s["n_undesirable"] if s["n_undesirable"] else
                   math.nan,
                   "charts/desirable_fraction": s["n_desirable"] / s["n"],
                   "charts/skipped_images": s["skipped"] * args.grad_accum * dist.world_size,
                   "charts/skipped_images_total": skipped_total, "charts/learning_rate": lr_now,
                   "charts/grad_norm": grad_norm.item(), "charts/images_seen": step * images_per_step,
                   "charts/epoch": step * images_per_step / len(images),
                   "charts/images_per_second": images_since / (time.time() - clock)}
            logger.log(row, step)
            progress.set_postfix(loss=f"{row['losses/loss']:.4f}", acc=f"{row['losses/implicit_acc']:.2f}")
            clock, images_since = time.time(), 0
        if step % args.checkpoint_every == 0 or step in (args.stop_at_step, args.steps):  # the last: --resume --steps
            weights = get_peft_model_state_dict(unet) if args.lora_rank else unet.state_dict()
            save_checkpoint(out, step, {weights_name: weights}, generators=[gen], script="diffusion_kto.py", extra={
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict(), "args": args, "base_model": args.model,
                "skipped_images_total": skipped_total})
        if dist.is_main and grid_prompts and (step % args.sample_every == 0 or step == args.steps):
            sample_grid(step)
        barrier()
        if step == args.stop_at_step:
            break
    progress.close()
    if step < args.steps:
        if dist.is_main:
            print(f"stopped after step {step}; continue with: --resume --output-dir {out}")
        logger.close()
        cleanup_distributed()
        return {"stopped_at": step}

    # ---- final weights in diffusers' format, then evaluation (rank 0)
    summary = {}
    if dist.is_main:
        load = save_final(family, unet, args.lora_rank > 0, args.model, out)  # final/unet or final/lora
        unet.eval()
        summary = {"train_images": len(images), "train_desirable": n_desirable, "steps": args.steps,
                   "images_per_step": images_per_step, "skipped_images_total": skipped_total}
        if eval_images:
            summary.update(heldout_eval(unet, ref_unet, eval_images, vae, tokenizers, text_encoders, family, timesteps,
                                        noise_scheduler, args, autocast))
        if args.toy and args.reward_seeds:  # the toy reward of fixed-seed samples, base model vs trained model
            check = load_prompts(args.validation_prompts or str(toy_world().prompts))
            prompts = [p for _ in range(args.reward_seeds) for p in check]
            seeds = list(range(len(prompts)))
            with reference_unet(unet, ref_unet) as ref:
                base = toy_reward(generate(make_pipe(unet=ref), prompts, seeds, args, autocast), prompts)
            final = toy_reward(generate(make_pipe(unet=unet), prompts, seeds, args, autocast), prompts)
            try:
                p_value = float(scipy.stats.wilcoxon(final.numpy(), base.numpy()).pvalue)
            except ValueError:  # every difference is zero
                p_value = 1.0
            summary.update({"eval/reward_base": base.mean().item(), "eval/reward_final": final.mean().item(),
                            "eval/reward_win_rate": (final > base).float().mean().item(),
                            "eval/reward_pvalue": p_value, "eval/reward_samples": len(prompts),
                            "reward_prompts": check,
                            "reward_test": "Wilcoxon signed-rank, two-sided, paired by prompt and seed"})
        if "eval/reward_final" in summary and (warning := below_base_warning(
                summary["eval/reward_final"], summary["eval/reward_base"], "toy reward")):
            summary["warning"] = warning
        logger.log({k: v for k, v in summary.items() if k.startswith("eval/")}, args.steps)
        (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        print((f"held-out AUC {summary['eval/auc']:.3f} on {summary['eval/images']} labelled images"
               if eval_images else "no held-out evaluation (no held-out split)")
              + (f"; toy reward {summary['eval/reward_base']:.4f} -> {summary['eval/reward_final']:.4f} "
                 f"(p = {summary['eval/reward_pvalue']:.2g})" if "eval/reward_base" in summary else ""))
        print(f"load the result with:\n    {load}")
    logger.close()
    barrier()
    cleanup_distributed()
    return summary


if __name__ == "__main__":
    main(parse_args())
