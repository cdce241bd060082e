"""Diffusion-DPO: fine-tune Stable Diffusion 1.5 or SDXL on human preference pairs (Wallace et al. 2023).

Docs (usage, logged metrics, implementation details with sources, toy results, tests): docs/diffusion_dpo.md

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
    python diffusion_dpo.py --relabel-with pickscore                    # AI feedback: PickScore picks the winners

SDXL (the paper's headline model; detected from the UNet's config, see common/models.py): the official
launchers/sdxl.sh recipe, 1024 px, 2048 pairs per step, Adafactor, 200 warm-up steps, gradient checkpointing:
    torchrun --nproc_per_node 16 diffusion_dpo.py --model stabilityai/stable-diffusion-xl-base-1.0 \
        --vae madebyollin/sdxl-vae-fp16-fix --gradient-checkpointing                # 1 × 16 × 128 = 2048
    torchrun --nproc_per_node 8 diffusion_dpo.py --model stabilityai/stable-diffusion-xl-base-1.0 \
        --vae madebyollin/sdxl-vae-fp16-fix --gradient-checkpointing --grad-accum 256   # 1 × 8 × 256 = 2048
    python diffusion_dpo.py --toy --toy-model sdxl                      # the toy SDXL pipeline, same data
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

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
from common.data import (EpochPairs, PairDataset, build_latent_cache, cached_batch, collate_pairs, collate_skip_none,
                         data_files, has_heldout_split, load_pairs, load_prompts, micro_batches, pair_selection,
                         relabel_pairs, score_pairs)
from common.runtime import (MetricsLogger, reference_unet, all_reduce_mean, barrier, batch_arithmetic,
                            below_base_warning, check_finite, check_model_path, check_resolution, check_resume_args,
                            cleanup_distributed, fingerprint,
                            load_checkpoint, prepare_output_dir, require, save_checkpoint, save_image_grid,
                            seed_everything, set_rng_state, setup_distributed, write_args)
from common.models import (all_timesteps, ddim_sampler, encode_text_sd15, is_turbo, load_text_encoders, load_vae,
                           make_pipeline, model_family, save_final, turbo_timesteps, zero_terminal_snr)
from common.scorers import ScorerName, load_scorer, scorer_fingerprint
from common.toy import toy_model_in, toy_reward, toy_sdxl_pipeline, toy_world

HUB_SOURCES = {"pickapic": "yuvalkirstain/pickapic_v2", "imagereward": "THUDM/ImageRewardDB"}
PAPER_PAIRS_PER_STEP = 2048


@dataclasses.dataclass
class Args:
    toy: bool = False
    """run on the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""
    toy_model: Literal["sd15", "sdxl"] = "sd15"
    """--toy: the SD1.5-shaped toy pipeline, or the SDXL-shaped one (built on first use; the same toy data)"""
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
    """hub id or local folder of an SD1.5 or SDXL pipeline (SDXL if its UNet has addition_embed_type "text_time";
    sdxl-turbo if the name contains "turbo": t ∈ {249, 499, 749, 999}, 512 px, no prompt dropout, as official)"""
    vae: str | None = None
    """hub id or folder of a VAE replacing the pipeline's (official SDXL recipe: madebyollin/sdxl-vae-fp16-fix)"""
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
    relabel_with: ScorerName | None = None
    """AI feedback (official --choice_model hps|clip|pickscore|aes): the common/scorers.py scorer that picks each
    training pair's winner on its raw scores, once before training (cached), with the official choice models'
    defaults (load_scorer(feedback=True): clip = OpenCLIP ViT-H/14's raw cosine, hps = HPS v2.0); a pair it scores
    equal keeps the row's first image (jpg_0) as the winner, as the official code"""
    scorer_path: str | None = None
    """--relabel-with's weights where it needs them (see common.scorers.load_scorer: reward-model, aesthetic, ...)"""
    clip_path: str | None = None
    """the CLIP behind --relabel-with aesthetic / reward-model, or the processor of pickscore / clip / hps (None: the
    scorer's default)"""
    max_pairs: int | None = None
    """train on the first N pairs only (None: all)"""
    eval_pairs: int | None = 500
    """held-out pairs to evaluate (None: all)"""
    resolution: int | None = None
    """images are resized (shorter side, bilinear) and centre-cropped to this (None: 512; SDXL base 1024)"""
    random_flip: bool = True
    """flip each image horizontally with p=0.5, redrawn every epoch (official default; its --no_hflip disables)"""
    prompt_dropout: float | None = None
    """probability that a pair's caption is replaced by "" (None: official --proportion_empty_prompts 0.2; turbo 0)"""
    cache_latents: bool = False
    """encode every image (both flips) with the VAE once into a file under --cache-dir; cache text embeddings"""
    cache_dir: str | None = None
    """latent (and --relabel-with score) cache folder, keyed by the VAE's and the data's bytes (None:
    <output-dir>/latent_cache, cleared by --overwrite); a shared filesystem for multi-node runs"""
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
    warmup_steps: int | None = None
    """optimizer steps of linear warm-up from 0, then constant (official constant_with_warmup; None: 500, SDXL 200)"""
    optimizer: Literal["adamw", "adafactor"] | None = None
    """None: AdamW (SD1.5), Adafactor (SDXL, to fit memory; official --use_adafactor: no relative step or parameter
    scaling, update clipping 1.0, the same lr and weight decay)"""
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
    """recompute UNet activations in the backward pass: less memory, ~30 % slower (the official SDXL runs: always on)"""
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
    """prompt set for the sample grids and, with --toy, eval.json's toy-reward check (common.data.load_prompts; None:
    the first captions of --eval-split, and the toy world's prompts for the check)"""
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


def toy_defaults(toy_model: str = "sd15") -> Args:
    """--toy: the toy world's model and data, and a recipe that shows the effect in ~90 s on 2 CPU cores."""
    world = toy_world()
    return Args(
        toy=True, toy_model=toy_model, model=str(world.pipeline if toy_model == "sd15" else toy_sdxl_pipeline()),
        resolution=world.resolution, mixed_precision="no", num_workers=0,
        steps=120, per_device_batch=16, grad_accum=1, learning_rate=3e-7, warmup_steps=10, cache_latents=False,
        log_every=5, checkpoint_every=60, sample_every=60, eval_pairs=None, eval_draws=8,
        validation_prompts=str(world.prompts), num_validation_prompts=24, sample_steps=20, guidance_scale=5.0,
    )


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--toy" in argv:
        return tyro.cli(Args, args=argv, default=toy_defaults(toy_model_in(argv)))
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


def pair_embeddings(captions, drop, tokenizers, text_encoders, cache: dict | None = None,
                    encode_text=encode_text_sd15):
    """The pairs' text conditioning for 2B rows, rows i and B+i identical: one caption, and one prompt-dropout
    decision (the caption becomes "" before encoding), per pair. `encode_text` is the model family's (common/models.py):
    SD1.5 gives hidden states (2B, 77, D); SDXL (hidden (2B, 77, D1 + D2), pooled (2B, P)). A single tokenizer and
    encoder may be passed bare. With `cache`, each caption is encoded once (kept on the CPU)."""
    tokenizers = tokenizers if isinstance(tokenizers, (list, tuple)) else [tokenizers]
    text_encoders = text_encoders if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    todo = [c for c in dict.fromkeys(captions) if cache is None or c not in cache]
    table = {} if cache is None else cache
    if todo:
        with torch.no_grad():
            out = encode_text(todo, tokenizers, text_encoders)
        parts = out if isinstance(out, tuple) else (out,)
        table.update({c: tuple(p[k] if cache is None else p[k].cpu() for p in parts) for k, c in enumerate(todo)})
    device = text_encoders[0].device
    rows = [torch.stack([table[c][j] for c in captions]).to(device) for j in range(len(table[captions[0]]))]
    rows = tuple(torch.cat([r, r]) for r in rows)  # (2B, ...): the winners' rows, then the same for the losers
    return rows if len(rows) > 1 else rows[0]


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
def heldout_eval(unet, ref_unet, pairs, vae, tokenizers, text_encoders, family, timesteps, noise_scheduler, args: Args,
                 autocast) -> dict:
    """Implicit-reward accuracy on held-out pairs: the fraction whose margin `inside`, averaged over --eval-draws
    (t, ε) draws, is > 0 (0.5 is chance). The draws come from seed 0, the same for every run and method."""
    gen, margins = torch.Generator().manual_seed(0), []
    loader = DataLoader(PairDataset(pairs, args.resolution, random_flip=False, seed=0),
                        batch_size=4 * args.per_device_batch, collate_fn=collate_skip_none)
    for batch in filter(None, loader):
        pixels = torch.cat([batch["pixel_w"], batch["pixel_l"]]).to(vae.device, vae.dtype)  # (2B, 3, R, R)
        moments = vae.encode(pixels).latent_dist.parameters  # (2B, 2C, h, w)
        num = len(batch["caption"])
        text = pair_embeddings(batch["caption"], torch.zeros(num, dtype=torch.bool), tokenizers, text_encoders,
                               encode_text=family.encode_text)
        inputs = family.unet_inputs(text, args.resolution)
        margin = torch.zeros(num)
        for _ in range(args.eval_draws):
            t, eps, z, _ = draw_noise(gen, num, (moments.shape[1] // 2, *moments.shape[2:]), 0.0,
                                      noise_scheduler.config.num_train_timesteps)
            x_t, t, eps = noisy_pairs(moments, timesteps(t).to(vae.device), eps.to(vae.device),
                                      z.flatten(0, 1).to(vae.device), noise_scheduler, vae.config.scaling_factor)
            with autocast():
                model_pred = unet(x_t, t, **inputs).sample
                with reference_unet(unet, ref_unet) as ref:
                    ref_pred = ref(x_t, t, **inputs).sample
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
    family, turbo = model_family(args.model), is_turbo(args.model)  # common/models.py: SD1.5 or SDXL, chosen once
    timesteps = turbo_timesteps if turbo else all_timesteps
    sdxl_base = family.name == "sdxl" and not turbo
    args = dataclasses.replace(  # the None defaults: the official recipe of this model family
        args, resolution=args.resolution or (1024 if sdxl_base else 512),
        prompt_dropout=(0.0 if turbo else 0.2) if args.prompt_dropout is None else args.prompt_dropout,
        warmup_steps=(200 if family.name == "sdxl" else 500) if args.warmup_steps is None else args.warmup_steps,
        optimizer=args.optimizer or ("adafactor" if family.name == "sdxl" else "adamw"))
    check_resolution(args.model, args.resolution)
    require(0 <= args.max_broken_fraction < 1,
            f"--max-broken-fraction must be in [0, 1), got {args.max_broken_fraction}")
    require(args.beta > 0, f"--beta must be > 0, got {args.beta}")
    require(args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}")
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
    # The caches' key of the training data: its bytes (read once, shared out among the ranks), only when a cache needs it
    data_key = fingerprint(*data_files(args.dataset, source, args.split), dist=dist) \
        if args.cache_latents or args.relabel_with else None
    relabel = None
    if args.relabel_with:  # AI feedback: the scorer's preferred image becomes the winner (scores cached, rank-sharded)
        try:
            scorer = load_scorer(args.relabel_with, args.scorer_path, clip_path=args.clip_path, device=dist.device,
                                 flags=("--scorer-path", "--clip-path"), feedback=True)
        except ValueError as e:
            raise ValueError(f"--relabel-with {args.relabel_with}: {e}") from e
        key = json.dumps(["feedback", scorer_fingerprint(args.relabel_with, args.scorer_path, args.clip_path, dist),
                          data_key, args.dataset, args.split, pair_selection(pairs)])  # what the scores depend on
        path = Path(args.cache_dir or out / "latent_cache") / f"scores-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        # the images as decoded (resolution None), not the training crop: the official choice models see jpg_0/jpg_1
        pairs, relabel = relabel_pairs(pairs, score_pairs(pairs, scorer, None, path.with_suffix(".safetensors"), dist,
                                                          device=dist.device, key=key))
        del scorer
        if dist.is_main:
            print(f"relabelled by {args.relabel_with}: {relabel['flipped']} of {relabel['kept']} pairs flipped "
                  f"against the human labels (agreement {relabel['agreement']:.1%} of the decided ones); "
                  f"{relabel['ties']} scorer ties kept with jpg_0 winning, {relabel['undecodable']} undecodable pairs "
                  "dropped")
    micro = args.per_device_batch * dist.world_size  # pairs per micro-step, all GPUs together
    require(len(pairs) >= micro, f"{len(pairs)} training pairs cannot fill one micro-batch of {micro} pairs "
            f"(--per-device-batch {args.per_device_batch} × {dist.world_size} GPUs)")
    if dist.is_main:
        print(f"model: {family.pipeline_class.__name__} ({'turbo: t in 250·(t mod 4) + 249, ' if turbo else ''}"
              f"{args.resolution} px, prompt dropout {args.prompt_dropout:g}, {args.optimizer}, "
              f"{args.warmup_steps} warm-up steps)")
        print(f"pairs per optimizer step = {args.per_device_batch} per GPU × {dist.world_size} GPUs × "
              f"{args.grad_accum} accumulation = {pairs_per_step} ({2 * pairs_per_step} images)")
        print(f"learning rate = {args.learning_rate:g}" + (f" × {pairs_per_step} = {lr:g}" if args.scale_lr else ""))
        print(f"{args.steps} steps × {pairs_per_step} = {args.steps * pairs_per_step:,} pairs = "
              f"{args.steps * pairs_per_step / len(pairs):.2f} epochs of {len(pairs):,} {args.dataset} pairs "
              f"({args.split}, ties dropped); {len(eval_pairs)} held-out pairs ({args.eval_split})")
        if family.name == "sdxl" and args.mixed_precision == "fp16" and args.vae is None:
            print("WARNING: SDXL's own VAE overflows in fp16 (NaN latents): pass --vae madebyollin/sdxl-vae-fp16-fix "
                  "as the official recipe does")
        if not args.toy and pairs_per_step != PAPER_PAIRS_PER_STEP:
            print(f"WARNING: {pairs_per_step} pairs per step, the paper used {PAPER_PAIRS_PER_STEP}: raise "
                  f"--grad-accum to {PAPER_PAIRS_PER_STEP // (args.per_device_batch * dist.world_size)} to match")

    # ---- models: trained UNet in fp32 (autocast), everything frozen stored in the autocast dtype (official)
    device = dist.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    autocast = functools.partial(torch.autocast, device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no")
    tokenizers, text_encoders = load_text_encoders(args.model, family, device, weight_dtype)
    vae = load_vae(args.model, args.vae, device, weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")  # SD1.5: scaled_linear, 1000
    if turbo:  # official: turbo trains on a zero-terminal-SNR schedule (common.models.zero_terminal_snr)
        noise_scheduler.alphas_cumprod = zero_terminal_snr(noise_scheduler.alphas_cumprod)
    require(noise_scheduler.config.prediction_type == "epsilon", "the model must predict epsilon, as SD1.5 and SDXL do")
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
    if args.optimizer == "adafactor":  # official SDXL: factored second moments, no first moment, to fit memory
        optimizer = Adafactor(params, lr=lr, weight_decay=args.weight_decay, clip_threshold=1.0, scale_parameter=False,
                              relative_step=False)
    else:
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
    if relabel is not None and start == 0:
        logger.log({"data/relabel_flipped": relabel["flipped"], "data/relabel_agreement": relabel["agreement"]}, 0)

    cache, text_cache = None, None
    if args.cache_latents:
        vae_files = args.vae or (Path(args.model) / "vae" if Path(args.model).exists() else args.model)
        cache = build_latent_cache(pairs, vae, args.resolution, args.random_flip,  # key: the VAE's and the pairs' bytes
                                   [fingerprint(vae_files, dist=dist), data_key, args.dataset, args.split,
                                    pair_selection(pairs)],
                                   Path(args.cache_dir or out / "latent_cache"), dist, args.per_device_batch,
                                   args.num_workers)
        text_cache = {}
        valid = torch.isfinite(cache[:, 0, 0, 0, 0, 0])  # a NaN row is a pair whose image did not decode
    keys = micro_batches(len(pairs), args.per_device_batch, dist.rank, dist.world_size, args.seed,
                         start=start * args.grad_accum)
    if cache is None:
        loader = iter(DataLoader(EpochPairs(pairs, args.resolution, args.random_flip, args.seed), batch_sampler=keys,
                                 collate_fn=collate_pairs, num_workers=args.num_workers))
    rows = slice(dist.rank * args.per_device_batch, (dist.rank + 1) * args.per_device_batch)  # this rank's pairs

    make_pipe = functools.partial(make_pipeline, family, args.model, vae=vae, tokenizers=tokenizers,
                                  text_encoders=text_encoders,
                                  scheduler=ddim_sampler(noise_scheduler.config))
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
            x_t, t, eps = noisy_pairs(moments, timesteps(t[rows]).to(device), eps[rows].to(device),
                                      z[:, rows].flatten(0, 1).to(device), noise_scheduler, vae.config.scaling_factor)
            text = pair_embeddings(captions, drop[rows], tokenizers, text_encoders, text_cache, family.encode_text)
            inputs = family.unet_inputs(text, args.resolution)  # encoder_hidden_states (2B, 77, D) [, SDXL's added]
            last = micro_step == args.grad_accum - 1
            with model.no_sync() if dist.world_size > 1 and not last else contextlib.nullcontext():
                with autocast():
                    model_pred = model(x_t, t, **inputs).sample  # (2B, 4, h, w)
                    with torch.no_grad(), reference_unet(unet, ref_unet) as ref:
                        ref_pred = ref(x_t, t, **inputs).sample  # (2B, 4, h, w)
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
        if step % args.checkpoint_every == 0 or step in (args.stop_at_step, args.steps):  # the last: --resume --steps
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
        load = save_final(family, unet, args.lora_rank > 0, args.model, out)  # final/unet or final/lora
        unet.eval()
        summary = {"train_pairs": len(pairs), "steps": args.steps, "pairs_per_step": pairs_per_step,
                   "skipped_pairs_total": skipped_total,
                   **({f"relabel/{k}": v for k, v in relabel.items()} if relabel else {})}
        if eval_pairs:
            summary.update(heldout_eval(unet, ref_unet, eval_pairs, vae, tokenizers, text_encoders, family, timesteps,
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
