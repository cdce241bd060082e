"""Diffusion-DPO: fine-tune Stable Diffusion 1.5 on human preference pairs (Wallace et al. 2023).

Paper https://arxiv.org/abs/2311.12908 · official code https://github.com/SalesforceAIResearch/DiffusionDPO (train.py)

For a caption c with a preferred image x_w and a rejected one x_l (as VAE latents), draw ONE timestep t ~ U{0..999}
and ONE noise ε ~ N(0, I) for the pair, noise both images with them, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, and compare the
trained UNet ε_θ with the frozen reference ε_ref (the UNet we started from):

    mse_θ(x) = mean_{c,h,w} ‖ε − ε_θ(x_t, t, c)‖²                        (likewise mse_ref with ε_ref)
    inside   = −(β/2)·[ (mse_θ(x_w) − mse_ref(x_w)) − (mse_θ(x_l) − mse_ref(x_l)) ]
    L(θ)     = −E_{(c, x_w, x_l), t, ε} log σ(inside)                    (paper Eq. 14 at the official code's scale)

Denoising the winner better than the reference does, by more than the loser, raises the model's implicit reward of
x_w over x_l; β is the weight of the KL term that keeps θ near the reference.

Paper symbol -> flag / variable:  β -> --beta / beta;  ε_θ, ε_ref -> model_pred, ref_pred;  x_w, x_l -> latents
stacked (2B, 4, 64, 64), winners first;  t, ε -> t, eps;  ᾱ_t -> noise_scheduler.alphas_cumprod;  pairs per
optimizer step (2048 in the paper) -> --per-device-batch × GPUs × --grad-accum.

Usage (the defaults are the official SD1.5 recipe, 2048 pairs per step = 1 per GPU × 16 GPUs × 128 accumulation):
    torchrun --nproc_per_node 16 diffusion_dpo.py --beta 5000           # the paper's run
    torchrun --nproc_per_node 8 diffusion_dpo.py --grad-accum 256       # 8 GPUs, the same 2048 pairs per step
    python diffusion_dpo.py --grad-accum 2048 --cache-latents           # one GPU (about 16x the 16-GPU time)
    python diffusion_dpo.py --lora-rank 64 --dataset imagereward        # LoRA on ImageRewardDB's comparisons
    python diffusion_dpo.py --toy                                       # the offline toy world, ~2 min on a CPU
"""

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Literal

import scipy.stats
import torch
import torch.distributed as tdist
import tyro
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from common import kernels
from common.data import PairDataset, collate_skip_none, flip_decision, has_heldout_split, load_pairs, load_prompts
from common.runtime import (MetricsLogger, absolute, reference_unet, all_reduce_mean, barrier, batch_arithmetic,
                            check_finite, check_model_path, check_resolution, check_resume_args, cleanup_distributed,
                            load_checkpoint, prepare_output_dir, require, save_checkpoint, save_image_grid,
                            seed_everything, set_rng_state, setup_distributed, write_args)
from common.toy import toy_reward, toy_world

HUB_SOURCES = {"pickapic": "yuvalkirstain/pickapic_v2", "imagereward": "THUDM/ImageRewardDB"}
PAPER_PAIRS_PER_STEP = 2048


@dataclasses.dataclass
class Args:
    toy: bool = False
    """run on the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""
    output_dir: str | None = None
    """args.json, metrics.jsonl, tb/, checkpoints/, samples/, final/, eval.json (None: runs/diffusion_dpo-<time>)"""
    seed: int = 0
    """seeds data order, flips, t, ε, prompt dropout (the same stream on every GPU: see draw_noise) and LoRA init"""
    resume: bool = False
    """continue exactly from <output-dir>/checkpoints/latest: data order, RNG streams, optimizer, LR schedule"""
    overwrite: bool = False
    """start afresh in a non-empty --output-dir, deleting the previous run's outputs (refused without this flag)"""
    stop_at_step: int | None = None
    """checkpoint and exit after this step, as a preempted job would; run again with --resume to continue"""

    # Model and data
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local folder of a StableDiffusionPipeline (the old runwayml/... id was deleted)"""
    dataset: Literal["pickapic", "imagereward"] = "pickapic"
    """preference pairs: Pick-a-Pic v2 (the paper) or ImageRewardDB rankings (every pair of a prompt's images)"""
    dataset_source: str | None = None
    """hub id, parquet file or folder in that layout (None: yuvalkirstain/pickapic_v2 or THUDM/ImageRewardDB)"""
    split: str = "train"
    """training split; ties (0.5/0.5) are dropped as in the official code (~851k Pick-a-Pic v2 pairs remain)"""
    eval_split: str = "validation"
    """held-out split for the final implicit-reward accuracy (paper: 60.8 % on Pick-a-Pic v2 validation); a single
    parquet file as --dataset-source has no held-out split: the evaluation is then skipped, with a message"""
    max_broken_fraction: float = 0.01
    """rows with unusable labels (null, non-numeric, out of range) are skipped and counted up to this fraction of a
    split; above it the run stops, naming the column (common/data.py)"""
    max_pairs: int | None = None
    """train on the first N pairs only (None: all)"""
    eval_pairs: int | None = 500
    """held-out pairs to evaluate (None: all)"""
    resolution: int = 512
    """images are resized (shorter side, bilinear) and centre-cropped to this many pixels"""
    random_flip: bool = True
    """flip each image horizontally with p=0.5, redrawn every epoch (official default; its --no_hflip disables)"""
    prompt_dropout: float = 0.2
    """probability that a pair's caption is replaced by "" (official --proportion_empty_prompts 0.2)"""
    cache_latents: bool = False
    """encode every image (both flips) with the VAE once into a file under --cache-dir; cache text embeddings"""
    cache_dir: str | None = None
    """latent cache folder (None: <output-dir>/latent_cache); a shared filesystem for multi-node runs"""
    num_workers: int = 8
    """DataLoader processes per GPU decoding images"""

    # The method
    beta: float = 5000.0
    """β, the KL weight, at the official scale (−β/2 in front; diffusers' LoRA example writes the same as 2500)"""
    lora_rank: int = 0
    """0: full UNet fine-tune (the paper); N > 0: LoRA of rank N, the reference is the UNet with adapters off"""

    # Optimisation
    steps: int = 2000
    """optimizer steps"""
    per_device_batch: int = 1
    """pairs per GPU per forward pass (each pair puts 2 images through both UNets)"""
    grad_accum: int = 128
    """micro-batches per optimizer step: pairs per step = per-device batch × GPUs × grad-accum (paper: 2048)"""
    learning_rate: float = 1e-8
    """per pair with --scale-lr: 1e-8 × 2048 = 2.048e-5 (the official code; the paper's text says 2.048e-8)"""
    scale_lr: bool = True
    """multiply --learning-rate by the pairs per optimizer step (official --scale_lr)"""
    warmup_steps: int = 500
    """optimizer steps of linear warm-up from 0, then constant (official constant_with_warmup)"""
    adam_beta1: float = 0.9
    """AdamW β1 (official)"""
    adam_beta2: float = 0.999
    """AdamW β2 (official)"""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay (official)"""
    adam_eps: float = 1e-8
    """AdamW ε (official)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (official)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """autocast dtype over fp32 trained weights; the frozen VAE, text encoder and reference are stored in it"""
    gradient_checkpointing: bool = False
    """recompute UNet activations in the backward pass: less memory, ~30 % slower"""
    compile: bool = False
    """torch.compile the loss kernel (common/kernels.py); eager is the reference"""
    compile_unet: bool = False
    """torch.compile the trained UNet as well"""

    # Logging, checkpoints, evaluation
    log_every: int = 10
    """write metrics every N optimizer steps (and at step 1, where θ = ref and the loss is ln 2)"""
    checkpoint_every: int = 500
    """save a resumable checkpoint every N steps (official --checkpointing_steps 500)"""
    sample_every: int = 250
    """save a grid of fixed-seed samples every N steps (and before the first)"""
    validation_prompts: str | None = None
    """prompt set for the sample grids (common.data.load_prompts; None: the first captions of --eval-split)"""
    num_validation_prompts: int = 8
    """prompts in the sample grid, prompt i always with seed i"""
    sample_steps: int = 50
    """DDIM steps for the sample grids"""
    guidance_scale: float = 7.5
    """classifier-free guidance for the sample grids"""
    eval_draws: int = 1
    """(t, ε) draws per held-out pair; each pair's implicit reward margin is averaged over them"""
    reward_seeds: int = 4
    """toy only: samples per toy prompt for the base-vs-final toy-reward test (0: skip)"""


def toy_defaults() -> Args:
    """--toy: the toy world's model and data, and a recipe that shows the effect in ~90 s on 2 CPU cores."""
    world = toy_world()
    return Args(
        toy=True, model=str(world.pipeline), resolution=world.resolution, mixed_precision="no", num_workers=0,
        steps=120, per_device_batch=16, grad_accum=1, learning_rate=3e-7, warmup_steps=10, cache_latents=False,
        log_every=5, checkpoint_every=60, sample_every=60, eval_pairs=None, eval_draws=8,
        validation_prompts=str(world.prompts), num_validation_prompts=24, sample_steps=20, guidance_scale=5.0,
    )


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--toy" in argv:
        return tyro.cli(Args, args=argv, default=toy_defaults())
    return tyro.cli(Args, args=argv)


# ------------------------------------------------------------------------------------------- the algorithm
def diffusion_dpo_loss(model_pred, ref_pred, target, beta: float, compile: bool = False):
    """Diffusion-DPO loss (paper Eq. 14, as the official train.py computes it), on common.kernels.dpo_loss.

    model_pred, ref_pred, target: (2B, C, H, W), the B winners first, then the B losers; target is the noise ε.
        mse(x)  = mean_{c,h,w} (ε_pred − ε)²                                  in float32
        r(x)    = −(β/2)·(mse_θ(x) − mse_ref(x))                             the implicit reward
        inside  = r(x_w) − r(x_l) = −(β/2)·[(mse_θ(x_w) − mse_ref(x_w)) − (mse_θ(x_l) − mse_ref(x_l))]
        loss    = −mean log σ(inside);   implicit accuracy = mean(inside > 0)
    At θ = ref, inside = 0: the loss is ln 2 and the accuracy 0.

    Scale of β: the official code multiplies by −½β (β = 5000); diffusers' LoRA example (train_diffusion_dpo.py)
    drops the ½ and defaults to 2500: the same objective. The paper's pseudocode sums the squared error over the
    latent's C·H·W values (`.norm().pow(2)`, 16384 of them at 512 px) instead of averaging, so its β is on a scale
    C·H·W times smaller. Returns (loss, inside (B,), metrics: dict of detached scalars).
    """
    loss, inside, mse_model, mse_ref = kernels.compiled(kernels.dpo_loss, enabled=compile)(
        model_pred, ref_pred, target, beta)  # scalar, (B,), (2B,), (2B,)
    model_w, model_l = mse_model.detach().chunk(2)
    ref_w, ref_l = mse_ref.detach().chunk(2)
    inside_d = inside.detach()
    metrics = {
        "losses/implicit_acc": (inside_d > 0).float().mean(),
        "losses/mse_model_w": model_w.mean(), "losses/mse_model_l": model_l.mean(),
        "losses/mse_ref_w": ref_w.mean(), "losses/mse_ref_l": ref_l.mean(),
        "rewards/winner": (-0.5 * beta * (model_w - ref_w)).mean(),
        "rewards/loser": (-0.5 * beta * (model_l - ref_l)).mean(),
        "rewards/margin": inside_d.mean(),
    }
    return loss, inside, metrics


def draw_noise(gen: torch.Generator, num_pairs: int, latent_shape, prompt_dropout: float, num_timesteps: int):
    """One micro-step's randomness for the GLOBAL micro-batch (all GPUs): t (G,), ε (G, C, h, w), the posterior's
    standard-normal draw z (2, G, C, h, w) for winners and losers, and the prompt-dropout mask (G,). Every rank
    draws the same numbers from its copy of `gen` and keeps its own rows, so N GPUs train exactly as one process
    with the same global batch does."""
    t = torch.randint(0, num_timesteps, (num_pairs,), generator=gen)
    eps = torch.randn((num_pairs, *latent_shape), generator=gen)
    z = torch.randn((2, num_pairs, *latent_shape), generator=gen)
    drop = torch.rand(num_pairs, generator=gen) < prompt_dropout
    return t, eps, z, drop


def noisy_pairs(moments, t, eps, z, noise_scheduler, scaling_factor: float):
    """x_t for winners and losers, each pair noised with ITS shared t and ε.

    moments (2B, 2C, h, w): the VAE posterior's parameters (mean, log-variance), winners first; t (B,);
    eps (B, C, h, w); z (2B, C, h, w). Returns x_t, t, eps, each (2B, ...) with rows i and B+i sharing t and ε.
    """
    posterior = DiagonalGaussianDistribution(moments)
    x_0 = ((posterior.mean + posterior.std * z.to(moments.dtype)) * scaling_factor).float()  # latent_dist.sample()
    t, eps = t.repeat(2), eps.repeat(2, 1, 1, 1)  # (2B,), (2B, C, h, w)
    return noise_scheduler.add_noise(x_0, eps, t), t, eps  # x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε


def pair_embeddings(captions, drop, tokenizer, text_encoder, cache: dict | None = None):
    """CLIP hidden states (2B, 77, D) for the pairs, rows i and B+i identical: one caption, and one prompt-dropout
    decision (the caption becomes ""), per pair. With `cache`, each caption is encoded once (kept on the CPU)."""
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    todo = [c for c in dict.fromkeys(captions) if cache is None or c not in cache]
    table = {} if cache is None else cache
    if todo:
        ids = tokenizer(todo, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = text_encoder(ids.to(text_encoder.device))[0]  # (U, 77, D)
        table.update(zip(todo, hidden if cache is None else hidden.cpu()))
    emb = torch.stack([table[c] for c in captions]).to(text_encoder.device)  # (B, 77, D)
    return emb.repeat(2, 1, 1)  # (2B, 77, D)


# ------------------------------------------------------------------------------------------- data
# Generic machinery (per-epoch flips, a DDP-exact data order, the latent cache) that keeps this file past STYLE's
# ~500 lines; it belongs in common/data.py as soon as a second script needs it.
def flip_seed(seed: int, epoch: int) -> int:
    return 10_000 * seed + epoch  # flips are redrawn every epoch, as the official RandomHorizontalFlip is


def micro_batches(num_pairs: int, per_device: int, rank: int, world_size: int, seed: int, start: int):
    """This rank's [(epoch, pair index), ...] for every micro-step from `start` on. Epoch e visits the pairs in the
    order randperm(num_pairs, seed + e), cut into global micro-batches of per_device × world_size (the rest of an
    epoch is dropped); rank r takes the r-th slice. A function of the step alone: --resume needs no sampler state."""
    size = per_device * world_size
    per_epoch, epoch = num_pairs // size, None
    for k in itertools.count(start):
        if k // per_epoch != epoch:
            epoch = k // per_epoch
            order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        first = (k % per_epoch) * size + rank * per_device
        yield [(epoch, i) for i in order[first:first + per_device]]


class EpochPairs(torch.utils.data.Dataset):
    """PairDataset items keyed by (epoch, index), with that epoch's flips. A pair whose image does not decode is
    replaced by the next good one, so every rank's micro-batch stays full (an empty one would hang DDP)."""

    def __init__(self, pairs, resolution: int, random_flip: bool, seed: int):
        self.pairs, self.resolution, self.random_flip, self.seed = pairs, resolution, random_flip, seed

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, key):
        epoch, index = key
        data = PairDataset(self.pairs, self.resolution, self.random_flip, flip_seed(self.seed, epoch))
        for skipped in range(len(self.pairs)):
            if (item := data[(index + skipped) % len(self.pairs)]) is not None:
                return {**item, "skipped": skipped}
        raise RuntimeError("no pair in the data set decodes")


def collate_pairs(items):
    batch = collate_skip_none(items)
    batch["num_skipped"] = sum(item["skipped"] for item in items)
    return batch


def build_latent_cache(pairs, vae, args: Args, source: str, dist, out: Path) -> torch.Tensor:
    """VAE posterior parameters (mean, log-variance) of every training image, as is and flipped, encoded once:
    (N, 2 [winner, loser], F [as is, flipped], 2C, h, w) in a file-backed tensor, NaN rows for pairs that do not
    decode. We keep the distribution, not a latent, because the official code draws latent_dist.sample() afresh at
    every visit (noisy_pairs still does); both flips because the flip is redrawn every epoch. Pick-a-Pic v2 at 512 px
    in fp16: 851k × 2 × 2 × 8 × 64 × 64 × 2 B ≈ 220 GB, so point --cache-dir at a big local disk. Each rank
    encodes every world_size-th pair into the shared file; a later run with the same key reuses it."""
    flips = 2 if args.random_flip else 1
    side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(pairs), 2, flips, 2 * vae.config.latent_channels, side, side)
    key = json.dumps([args.model, args.dataset, source, args.split, args.max_pairs, args.resolution, flips,
                      str(vae.dtype)])
    root = Path(args.cache_dir or out / "latent_cache")
    path = root / f"latents-{hashlib.sha1(key.encode()).hexdigest()[:12]}.bin"
    if not path.with_suffix(".json").exists():
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(math.prod(shape) * vae.dtype.itemsize)
        barrier()
        cache = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=vae.dtype).view(shape)
        mine = list(range(dist.rank, len(pairs), dist.world_size))
        chunks = [mine[k:k + args.per_device_batch] for k in range(0, len(mine), args.per_device_batch)]
        loader = DataLoader(PairDataset(pairs, args.resolution, random_flip=False, seed=0), batch_sampler=chunks,
                            collate_fn=collate_skip_none, num_workers=args.num_workers)
        for wanted, batch in zip(chunks, tqdm(loader, desc="caching latents", disable=not dist.is_main)):
            cache[wanted] = float("nan")  # overwritten below for every pair that decodes
            if batch is None:
                continue
            x = torch.stack([batch["pixel_w"], batch["pixel_l"]], 1)  # (b, 2, 3, R, R)
            x = torch.stack([x, x.flip(-1)][:flips], 2)  # (b, 2, F, 3, R, R); flipping pixels = flipping the image
            with torch.no_grad():
                moments = vae.encode(x.flatten(0, 2).to(vae.device, vae.dtype)).latent_dist.parameters
            cache[batch["index"]] = moments.view(*x.shape[:3], *moments.shape[1:]).cpu()
        barrier()
        if dist.is_main:
            path.with_suffix(".json").write_text(key)  # marks the cache complete
    return torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=vae.dtype).view(shape)


def cached_batch(cache, valid, pairs, keys, random_flip: bool, seed: int):
    """What a training micro-step needs from the latent cache: moments (2B, 2C, h, w) winners first, captions,
    and how many broken pairs were replaced by the next good one (the same rule as EpochPairs)."""
    index, flip_w, flip_l, skipped = [], [], [], 0
    for epoch, i in keys:
        while not valid[i]:
            i, skipped = (i + 1) % len(valid), skipped + 1
        index.append(i)
        flip_w.append(int(random_flip and flip_decision(flip_seed(seed, epoch), i, "w")))
        flip_l.append(int(random_flip and flip_decision(flip_seed(seed, epoch), i, "l")))
    moments = torch.cat([cache[index, 0, flip_w], cache[index, 1, flip_l]])  # (2B, 2C, h, w)
    return moments, [pairs[i].caption for i in index], skipped


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
def heldout_eval(unet, ref_unet, pairs, vae, tokenizer, text_encoder, noise_scheduler, args: Args, autocast) -> dict:
    """Implicit-reward accuracy on held-out pairs: the fraction whose margin `inside`, averaged over --eval-draws
    (t, ε) draws, is > 0 (0.5 is chance). The draws come from seed 0, the same for every run and method."""
    gen, margins = torch.Generator().manual_seed(0), []
    loader = DataLoader(PairDataset(pairs, args.resolution, random_flip=False, seed=0),
                        batch_size=4 * args.per_device_batch, collate_fn=collate_skip_none)
    for batch in filter(None, loader):
        pixels = torch.cat([batch["pixel_w"], batch["pixel_l"]]).to(vae.device, vae.dtype)  # (2B, 3, R, R)
        moments = vae.encode(pixels).latent_dist.parameters  # (2B, 2C, h, w)
        num = len(batch["caption"])
        emb = pair_embeddings(batch["caption"], torch.zeros(num, dtype=torch.bool), tokenizer, text_encoder)
        margin = torch.zeros(num)
        for _ in range(args.eval_draws):
            t, eps, z, _ = draw_noise(gen, num, (moments.shape[1] // 2, *moments.shape[2:]), 0.0,
                                      noise_scheduler.config.num_train_timesteps)
            x_t, t, eps = noisy_pairs(moments, t.to(vae.device), eps.to(vae.device), z.flatten(0, 1).to(vae.device),
                                      noise_scheduler, vae.config.scaling_factor)
            with autocast():
                model_pred = unet(x_t, t, emb).sample
                with reference_unet(unet, ref_unet) as ref:
                    ref_pred = ref(x_t, t, emb).sample
            margin += diffusion_dpo_loss(model_pred, ref_pred, eps, args.beta)[1].cpu() / args.eval_draws
        margins.append(margin)
    margin = torch.cat(margins)
    return {"eval/implicit_acc": (margin > 0).float().mean().item(), "eval/reward_margin": margin.mean().item(),
            "eval/pairs": len(margin)}


# ------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    dist = setup_distributed()
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(message)s")
    source = args.dataset_source or (str(getattr(toy_world(), args.dataset)) if args.toy else HUB_SOURCES[args.dataset])
    out = [args.output_dir or f"runs/diffusion_dpo-{time.strftime('%Y%m%d-%H%M%S')}"]
    if dist.world_size > 1:
        tdist.broadcast_object_list(out, src=0)  # one timestamped folder for all ranks
    out = Path(out[0])
    check_model_path(args.model, "--model")  # before the data loads: a mistyped path fails in a second
    check_resolution(args.model, args.resolution)
    require(0 <= args.max_broken_fraction < 1,
            f"--max-broken-fraction must be in [0, 1), got {args.max_broken_fraction}")
    require(args.beta > 0, f"--beta must be > 0, got {args.beta}")
    require(0 <= args.prompt_dropout < 1, f"--prompt-dropout must be in [0, 1), got {args.prompt_dropout}")
    require(args.steps >= 1 and args.lora_rank >= 0 and args.eval_draws >= 1, "--steps, --eval-draws must be >= 1 "
            f"and --lora-rank >= 0: got {args.steps}, {args.eval_draws}, {args.lora_rank}")
    require(min(args.log_every, args.checkpoint_every, args.sample_every) >= 1,
            "--log-every, --checkpoint-every and --sample-every must be >= 1")
    require(args.mixed_precision != "fp16" or dist.device.type == "cuda", "--mixed-precision fp16 needs a GPU")
    require(not args.resume or args.output_dir is not None, "--resume needs the --output-dir of the run to continue")
    prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, is_main=dist.is_main)
    pairs_per_step = batch_arithmetic(args.per_device_batch, dist.world_size, args.grad_accum)
    lr = args.learning_rate * (pairs_per_step if args.scale_lr else 1)
    seed_everything(args.seed, dist.rank)

    # ---- data: winner first, ties dropped (common.data.load_pairs)
    pairs = load_pairs(args.dataset, source, args.split, max_pairs=args.max_pairs, max_broken=args.max_broken_fraction)
    eval_pairs = []  # a single parquet file is one split: evaluating "held-out" on it would reuse the training rows
    if has_heldout_split(source):
        eval_pairs = load_pairs(args.dataset, source, args.eval_split, max_pairs=args.eval_pairs,
                                max_broken=args.max_broken_fraction)
    elif dist.is_main:
        print(f"--dataset-source {source} is a single parquet file, so it has no held-out split: the held-out "
              f"evaluation is skipped (point to a folder with {args.split} and {args.eval_split} splits to run it)")
    micro = args.per_device_batch * dist.world_size  # pairs per micro-step, all GPUs together
    require(len(pairs) >= micro, f"{len(pairs)} training pairs cannot fill one micro-batch of {micro} pairs "
            f"(--per-device-batch {args.per_device_batch} × {dist.world_size} GPUs)")
    if dist.is_main:
        print(f"pairs per optimizer step = {args.per_device_batch} per GPU × {dist.world_size} GPUs × "
              f"{args.grad_accum} accumulation = {pairs_per_step} ({2 * pairs_per_step} images)")
        print(f"learning rate = {args.learning_rate:g}" + (f" × {pairs_per_step} = {lr:g}" if args.scale_lr else ""))
        print(f"{args.steps} steps × {pairs_per_step} = {args.steps * pairs_per_step:,} pairs = "
              f"{args.steps * pairs_per_step / len(pairs):.2f} epochs of {len(pairs):,} {args.dataset} pairs "
              f"({args.split}, ties dropped); {len(eval_pairs)} held-out pairs ({args.eval_split})")
        if not args.toy and pairs_per_step != PAPER_PAIRS_PER_STEP:
            print(f"WARNING: {pairs_per_step} pairs per step, the paper used {PAPER_PAIRS_PER_STEP}: raise "
                  f"--grad-accum to {PAPER_PAIRS_PER_STEP // (args.per_device_batch * dist.world_size)} to match")

    # ---- models: trained UNet in fp32 (autocast), everything frozen stored in the autocast dtype (official)
    device = dist.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    autocast = functools.partial(torch.autocast, device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no")
    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder").to(device, weight_dtype)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").to(device, weight_dtype)
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")  # SD1.5: scaled_linear, 1000
    require(noise_scheduler.config.prediction_type == "epsilon", "the model must predict epsilon, as SD1.5 does")
    side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    require(side * 2 ** (len(vae.config.block_out_channels) - 1) == args.resolution,
            f"--resolution {args.resolution} must be a multiple of the VAE's downsampling factor")
    latent_shape = (vae.config.latent_channels, side, side)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device)
    if args.lora_rank:  # as diffusers' LoRA example: frozen base in the autocast dtype, adapters in fp32
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
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_eps)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")  # fp16 needs loss scaling
    gen = torch.Generator().manual_seed(args.seed)  # the loop's only random stream: t, ε, z, prompt dropout
    weights_name = "unet_lora" if args.lora_rank else "unet"

    start, skipped_total = 0, 0  # pairs replaced because an image did not decode, over the whole run
    if args.resume:
        start, weights, extra = load_checkpoint(out, script="diffusion_dpo.py")
        check_resume_args(extra["args"], args)
        skipped_total = extra.get("skipped_pairs_total", 0)
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

    cache, text_cache = None, None
    if args.cache_latents:
        cache, text_cache = build_latent_cache(pairs, vae, args, source, dist, out), {}
        valid = torch.isfinite(cache[:, 0, 0, 0, 0, 0])  # a NaN row is a pair whose image did not decode
    keys = micro_batches(len(pairs), args.per_device_batch, dist.rank, dist.world_size, args.seed,
                         start=start * args.grad_accum)
    if cache is None:
        loader = iter(DataLoader(EpochPairs(pairs, args.resolution, args.random_flip, args.seed), batch_sampler=keys,
                                 collate_fn=collate_pairs, num_workers=args.num_workers))
    rows = slice(dist.rank * args.per_device_batch, (dist.rank + 1) * args.per_device_batch)  # this rank's pairs

    make_pipe = functools.partial(StableDiffusionPipeline, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  scheduler=DDIMScheduler.from_config(noise_scheduler.config), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    if args.validation_prompts:
        grid_prompts = load_prompts(args.validation_prompts)[:args.num_validation_prompts]
    else:
        shown = eval_pairs or pairs  # the training captions when there is no held-out split
        grid_prompts = list(dict.fromkeys(shown[i].caption for i in range(min(len(shown), 1000))))
        grid_prompts = grid_prompts[:args.num_validation_prompts]

    def sample_grid(step: int) -> None:  # rank 0 only: fixed-seed samples of the current UNet
        unet.eval()
        pipe = make_pipe(unet=unet)
        pipe.set_progress_bar_config(disable=True)
        images = generate(pipe, grid_prompts, list(range(len(grid_prompts))), args, autocast)
        grid = save_image_grid(images, out / "samples" / f"step_{step:07d}.png", nrow=8, captions=grid_prompts,
                               upscale=max(1, 128 // args.resolution))
        logger.log_images("samples", grid, step)
        unet.train()

    if dist.is_main and start == 0 and grid_prompts:
        sample_grid(0)  # the base model, for comparison
    barrier()

    # ---- training loop: the algorithm
    unet.train()
    progress = tqdm(initial=start, total=args.steps, disable=not dist.is_main)
    clock, pairs_since, step = time.time(), 0, start
    for step in range(start + 1, args.steps + 1):
        totals = {}
        for micro_step in range(args.grad_accum):
            if cache is None:
                batch = next(loader)
                pixels = torch.cat([batch["pixel_w"], batch["pixel_l"]]).to(device, weight_dtype)  # (2B, 3, R, R)
                with torch.no_grad():
                    moments = vae.encode(pixels).latent_dist.parameters  # (2B, 2C, h, w), winners first
                captions, skipped = batch["caption"], batch["num_skipped"]
            else:
                moments, captions, skipped = cached_batch(cache, valid, pairs, next(keys), args.random_flip, args.seed)
                moments = moments.to(device)
            t, eps, z, drop = draw_noise(gen, micro, latent_shape, args.prompt_dropout,
                                         noise_scheduler.config.num_train_timesteps)
            x_t, t, eps = noisy_pairs(moments, t[rows].to(device), eps[rows].to(device),
                                      z[:, rows].flatten(0, 1).to(device), noise_scheduler, vae.config.scaling_factor)
            emb = pair_embeddings(captions, drop[rows], tokenizer, text_encoder, text_cache)  # (2B, 77, D)
            last = micro_step == args.grad_accum - 1
            with model.no_sync() if dist.world_size > 1 and not last else contextlib.nullcontext():
                with autocast():
                    model_pred = model(x_t, t, emb).sample  # (2B, 4, h, w)
                    with torch.no_grad(), reference_unet(unet, ref_unet) as ref:
                        ref_pred = ref(x_t, t, emb).sample  # (2B, 4, h, w)
                loss, _, metrics = diffusion_dpo_loss(model_pred, ref_pred, eps, args.beta, compile=args.compile)
                scaler.scale(loss / args.grad_accum).backward()
            for name, value in {"losses/loss": loss.detach(), **metrics, "charts/skipped_pairs": skipped}.items():
                totals[name] = totals.get(name, 0) + torch.as_tensor(value, dtype=torch.float32) / args.grad_accum
        stats = all_reduce_mean(torch.stack([v.to(device) for v in totals.values()]), dist)  # over GPUs
        check_finite(stats[0], step, out)  # before the update: the last checkpoint stays the last good one
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr_now = lr_scheduler.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        pairs_since += pairs_per_step
        skipped_total += round(stats[list(totals).index("charts/skipped_pairs")].item() * args.grad_accum *
                               dist.world_size)  # every step, not only logged ones

        if step % args.log_every == 0 or step == 1:
            row = dict(zip(totals, stats.tolist()))
            row["charts/skipped_pairs"] *= args.grad_accum * dist.world_size  # a count, not a mean
            row.update({"charts/skipped_pairs_total": skipped_total, "charts/learning_rate": lr_now,
                        "charts/grad_norm": grad_norm.item(),
                        "charts/pairs_seen": step * pairs_per_step, "charts/epoch": step * pairs_per_step / len(pairs),
                        "charts/pairs_per_second": pairs_since / (time.time() - clock)})
            logger.log(row, step)
            progress.set_postfix(loss=f"{row['losses/loss']:.4f}", acc=f"{row['losses/implicit_acc']:.2f}")
            clock, pairs_since = time.time(), 0
        if step % args.checkpoint_every == 0 or step == args.stop_at_step:
            weights = get_peft_model_state_dict(unet) if args.lora_rank else unet.state_dict()
            save_checkpoint(out, step, {weights_name: weights}, generators=[gen], script="diffusion_dpo.py", extra={
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict(), "args": args, "base_model": args.model,
                "skipped_pairs_total": skipped_total})
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
        if args.lora_rank:
            StableDiffusionPipeline.save_lora_weights(
                out / "final" / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
            load = f'from diffusers import StableDiffusionPipeline; pipe = StableDiffusionPipeline.from_pretrained(' \
                   f'"{absolute(args.model)}"); pipe.load_lora_weights("{absolute(out / "final" / "lora")}")'
        else:
            unet.save_pretrained(out / "final" / "unet")
            load = f'from diffusers import StableDiffusionPipeline, UNet2DConditionModel; pipe = StableDiffusion' \
                   f'Pipeline.from_pretrained("{absolute(args.model)}", unet=UNet2DConditionModel.from_pretrained(' \
                   f'"{absolute(out / "final" / "unet")}"))'
        unet.eval()
        summary = {"train_pairs": len(pairs), "steps": args.steps, "pairs_per_step": pairs_per_step,
                   "skipped_pairs_total": skipped_total}
        if eval_pairs:
            summary.update(heldout_eval(unet, ref_unet, eval_pairs, vae, tokenizer, text_encoder, noise_scheduler,
                                        args, autocast))
        if args.toy and args.reward_seeds:  # the toy reward of fixed-seed samples, base model vs trained model
            prompts = [p for _ in range(args.reward_seeds) for p in load_prompts(str(toy_world().prompts))]
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
                            "reward_test": "Wilcoxon signed-rank, two-sided, paired by prompt and seed"})
        logger.log({k: v for k, v in summary.items() if k.startswith("eval/")}, args.steps)
        (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        print((f"held-out implicit accuracy {summary['eval/implicit_acc']:.3f} on {summary['eval/pairs']} pairs"
               if eval_pairs else "no held-out evaluation (no held-out split)")
              + (f"; toy reward {summary['eval/reward_base']:.4f} -> {summary['eval/reward_final']:.4f} "
                 f"(p = {summary['eval/reward_pvalue']:.2g})" if "eval/reward_base" in summary else ""))
        print(f"load the result with:\n    {load}")
    logger.close()
    barrier()
    cleanup_distributed()
    return summary


if __name__ == "__main__":
    main(parse_args())
