"""Supervised baselines for aligning Stable Diffusion 1.5 or SDXL: SFT on preferred images, and reward-weighted
fine-tuning.

Docs (usage, logged metrics, implementation details with sources, toy results, tests): docs/sft.md

`--data preferred`: Diffusion-DPO's SFT baseline (Wallace et al. 2023, https://arxiv.org/abs/2311.12908; the official
train.py `--sft`): the plain denoising loss on the winner of every Pick-a-Pic v2 pair, ties dropped.

`--data generated`: Lee et al. 2023, "Aligning Text-to-Image Models using Human Feedback"
(https://arxiv.org/abs/2302.12192), DPOK's SFT baseline (Fan et al. 2023, https://arxiv.org/abs/2305.16381). Sample
N images once from the pretrained model, score each with a reward model r, and fine-tune on them with the denoising
loss weighted by the reward (the denoising loss is the diffusion ELBO's −log p_θ(x|z), so this is reward-weighted
likelihood), plus a regulariser that keeps the model near what it was:

    L(θ) = E_{(x_0, z) ~ D, t, ε} [ w · ‖ε − ε_θ(x_t, t, z)‖² ]  +  R(θ),     x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε

    preferred:  D = the winners, w = 1        generated:  D = the generated set, w = w(r(x_0, z))  (--weighting)
    R = 0                                                        --reg none
    R = β·E_{(x', z') ~ D_pre} ‖ε' − ε_θ(x'_t, t', z')‖²         --reg pretrain (Lee et al.: unlabelled captioned images)
    R = γ·E_{(x_0, z) ~ D} ‖ε_θ(x_t, t, z) − ε_pre(x_t, t, z)‖²  --reg kl (DPOK: the per-step KL to the pretrained model,
                                                                 two Gaussians of equal variance, is ∝ ‖ε_θ − ε_pre‖²)

‖·‖² is a mean over C, H, W (the official code's F.mse_loss), t ~ U{0..999}, ε ~ N(0, I).
Paper symbol -> flag / variable: r -> --scorer / rewards;  w -> --weighting / weights;  β, γ -> --reg-coef;
N -> --num-images;  D_pre -> --pretrain-data;  ε, ε_θ, ε_pre -> noise, model_pred, ref_pred;  x_t -> x_t.

Usage:
    python sft.py --data preferred --dataset-source /data/pickapic_v2 --grad-accum 256    # Diffusion-DPO's SFT, 1 GPU
    torchrun --nproc_per_node 8 sft.py --data preferred --dataset-source /data/pickapic_v2  # the same on 8 GPUs
    python sft.py --scorer reward-model --scorer-path runs/reward_model-XXXX/final --reg kl --lora-rank 4   # DPOK's
    python sft.py --reg pretrain --pretrain-data /data/laion_subset/ --weighting raw                 # Lee et al.'s
    python sft.py --toy                                          # the offline toy world, ~1.5 min on 2 CPU cores
    python sft.py --data preferred --model stabilityai/stable-diffusion-xl-base-1.0 --vae madebyollin/sdxl-vae-fp16-fix \
        --gradient-checkpointing --per-device-batch 1    # SDXL (official --sft --sdxl; the family is read from the UNet)
    python sft.py --toy --toy-model sdxl                         # the toy SDXL pipeline, same data
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import datasets
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import pyarrow as pa
import pyarrow.parquet as pq
import scipy.stats
import torch
import torch.distributed as tdist
import tyro
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import Adafactor

from common import kernels
from common.data import (Pair, decode_image, flip_decision, flip_seed, load_captioned_images, load_pairs, load_prompts,
                         micro_batches, preprocess)
from common.runtime import (MetricsLogger, reference_unet, all_reduce_mean, barrier, batch_arithmetic,
                            below_base_warning, check_finite, check_model_path, check_resolution, check_resume_args,
                            cleanup_distributed, fingerprint,
                            load_checkpoint, prepare_output_dir, require, save_checkpoint, save_image_grid,
                            seed_everything, set_rng_state, setup_distributed, write_args)
from common.models import (all_timesteps, ddim_sampler, is_turbo, load_text_encoders, load_vae, make_pipeline,
                           model_family, save_final, turbo_timesteps, zero_terminal_snr)
from common.scorers import load_scorer, scorer_fingerprint
from common.toy import png_bytes, toy_model_in, toy_sdxl_pipeline, toy_world

HUB_SOURCES = {"pickapic": "yuvalkirstain/pickapic_v2", "imagereward": "THUDM/ImageRewardDB"}
# Each baseline's recipe, for the fields left at None: images per step, steps, warm-up, learning rate per image.
RECIPES = {
    # batch, steps, warm-up: the official SD1.5 DPO launcher (launchers/sd15.sh; no launcher runs --sft). The lr is
    # ours: train.py has one default, 1e-8 per image (2.048e-5 after --scale_lr at 2048), shared by DPO and --sft;
    # we found no SFT value in the official code and could not confirm one in the paper.
    "preferred": dict(batch=2048, steps=2000, warmup_steps=500, learning_rate=1e-9),
    "generated": dict(batch=128, steps=8000, warmup_steps=0, learning_rate=2e-5 / 128),  # DPOK's SFT: 2e-5 at 128
}


@dataclasses.dataclass
class Args:
    toy: bool = False
    """run on the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""
    toy_model: Literal["sd15", "sdxl"] = "sd15"
    """--toy: the SD1.5-shaped toy pipeline, or the SDXL-shaped one (built on first use; the same toy data)"""
    output_dir: str | None = None
    """args.json, metrics.jsonl, tb/, checkpoints/, samples/, final/, eval.json (None: runs/sft-<data>-<time>)"""
    seed: int = 0
    """seeds data order, flips, t, ε, posterior draws, prompt dropout, LoRA init and the generated set"""
    resume: bool = False
    """continue exactly from <output-dir>/checkpoints/latest: data order, RNG streams, optimizer, LR schedule"""
    overwrite: bool = False
    """start afresh in a non-empty --output-dir, deleting the previous run's outputs (refused without this flag)"""

    # The baseline and its data
    data: Literal["preferred", "generated"] = "generated"
    """preferred: SFT on preference winners (Diffusion-DPO); generated: reward-weighted SFT on own samples (Lee/DPOK)"""
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local folder of an SD1.5 or SDXL pipeline (SDXL if its UNet has addition_embed_type "text_time";
    sdxl-turbo if the name contains "turbo": t ∈ {249, 499, 749, 999}, as diffusion_dpo.py)"""
    vae: str | None = None
    """hub id or folder of a VAE replacing the pipeline's (SDXL in fp16: madebyollin/sdxl-vae-fp16-fix)"""
    dataset: Literal["pickapic", "imagereward"] = "pickapic"
    """--data preferred: Pick-a-Pic v2 (the paper) or ImageRewardDB, whose images win once per pair they win"""
    dataset_source: str | None = None
    """--data preferred: hub id, parquet file or folder in that layout (None: the dataset's hub id, see HUB_SOURCES)"""
    split: str = "train"
    """--data preferred: training split; ties (0.5/0.5) are dropped, as in the official code"""
    max_broken_fraction: float = 0.01
    """--data preferred: rows with unusable labels are skipped and counted up to this fraction of the split; above it
    the run stops, naming the column (common/data.py)"""
    prompts: str = "partiprompts"
    """prompts of the generated set (image i: prompt i mod P) and of the sample grid: common.data.load_prompts"""
    num_images: int = 20000
    """--data generated: images in the generated set (DPOK: 20K)"""
    generated_dir: str = "runs/sft-generated"
    """--data generated: cache root; a set lives in a subfolder named by a hash of what determines it (the model's and
    the scorer's bytes, the prompts, the sampler), and is reused"""
    resolution: int | None = None
    """images are resized (shorter side, bilinear) and centre-cropped to this; samples are drawn at it (None: 512,
    SDXL base 1024)"""
    random_flip: bool = True
    """flip each training image horizontally with p=0.5, redrawn every epoch (official default)"""
    prompt_dropout: float = 0.2
    """probability that a caption is replaced by "" (official --proportion_empty_prompts 0.2, which --sft shares)"""
    num_workers: int = 8
    """DataLoader processes per GPU decoding images"""

    # The reward and the regulariser
    scorer: Literal["toy", "clip", "pickscore", "aesthetic", "reward-model", "none"] = "pickscore"
    """r, from common/scorers.py: weighs the generated set and scores the sample grids (none: --data preferred only)"""
    scorer_path: str | None = None
    """the scorer's weights where it needs them (reward-model: a reward_model.py output; aesthetic: the MLP head)"""
    clip_path: str | None = None
    """the CLIP behind the aesthetic and reward-model scorers, or PickScore's processor (None: the scorer's default)"""
    weighting: Literal["raw", "minmax", "binary"] = "minmax"
    """w, rescaled to mean 1: raw = r (Lee et al., r ≥ 0), minmax = (r − min)/(max − min), binary = 1[r ≥ quantile]"""
    binary_quantile: float = 0.5
    """--weighting binary: the reward quantile above which an image is 'good' (Lee et al.'s labels are good/bad)"""
    reg: Literal["none", "pretrain", "kl"] = "none"
    """R: none; pretrain = β·denoising loss on --pretrain-data (Lee et al.); kl = γ·‖ε_θ − ε_pre‖² (DPOK)"""
    reg_coef: float = 1.0
    """β or γ; w has mean 1, so 1.0 weighs R like the main loss (our default: neither paper's text gives a value)"""
    pretrain_data: str | None = None
    """--reg pretrain: unlabelled images with captions (parquet file or folder, or hub id; columns caption, image)"""

    # Optimisation
    lora_rank: int = 0
    """0: full UNet fine-tune (Diffusion-DPO's SFT); N > 0: LoRA of rank N (DPOK's code: 4); ε_pre = adapters off"""
    steps: int | None = None
    """optimizer steps (None: 2000 preferred, the official DPO run's; 8000 generated, DPOK)"""
    per_device_batch: int = 8
    """images per GPU per forward pass (with --reg pretrain, as many pre-training images again)"""
    grad_accum: int | None = None
    """micro-batches per step (None: per-device batch × GPUs × grad-accum = 2048 preferred, 128 generated)"""
    learning_rate: float | None = None
    """per image, × images per step as the official --scale_lr (None: 1e-9 preferred, ours, the official train.py
    default being 1e-8; 2e-5/128 generated)"""
    warmup_steps: int | None = None
    """optimizer steps of linear warm-up from 0, then constant (None: 500 preferred, the official DPO run's; 0
    generated)"""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay; β1 0.9, β2 0.999, ε 1e-8 (official)"""
    optimizer: Literal["adamw", "adafactor"] | None = None
    """None: AdamW (SD1.5), Adafactor (SDXL, as the official train.py for --sft --sdxl; settings as diffusion_dpo.py)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (official)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """autocast dtype over fp32 trained weights; the frozen VAE, text encoder and reference are stored in it"""
    gradient_checkpointing: bool = False
    """recompute UNet activations in the backward pass: less memory, more compute"""
    compile: bool = False
    """torch.compile the loss kernel (common/kernels.py); eager is the reference"""
    compile_unet: bool = False
    """torch.compile the trained UNet as well"""

    # Sampling, logging, checkpoints
    sample_steps: int = 50
    """DDIM steps for the generated set and the sample grids (DPOK: 50)"""
    guidance_scale: float = 7.5
    """classifier-free guidance for the sample grids, and for the generated set unless set below (DPOK: 7.5)"""
    generated_guidance_scale: float | None = None
    """guidance for the generated set (None: --guidance-scale); tuning on guided samples, then guiding, guides twice"""
    log_every: int = 10
    """write metrics every N optimizer steps (and at step 1)"""
    checkpoint_every: int = 500
    """save a resumable checkpoint every N steps"""
    sample_every: int = 500
    """save a grid of fixed-seed samples every N steps (and before the first and after the last)"""
    num_validation_prompts: int = 8
    """prompts in the sample grid and eval.json (the first of --validation-prompts), prompt i always with seed i"""
    validation_prompts: str | None = None
    """prompt set of the sample grid and eval.json (common.data.load_prompts; None: --prompts)"""
    reward_seeds: int = 0
    """samples per grid prompt for the final base-vs-trained reward comparison in eval.json (0: skip; toy: 4)"""


def toy_defaults(toy_model: str = "sd15") -> Args:
    """--toy: the toy world's model, data and reward, and a recipe that shows the effect in ~1.5 min on 2 CPU cores.
    The generated set is sampled at guidance 2 and the grids at 5 (see generated_guidance_scale and the README section on sft.py)."""
    world = toy_world()
    return Args(
        toy=True, toy_model=toy_model, model=str(world.pipeline if toy_model == "sd15" else toy_sdxl_pipeline()),
        prompts=str(world.prompts), pretrain_data=str(world.pretrain),
        resolution=world.resolution, scorer="toy", num_images=16 * 24, mixed_precision="no", num_workers=0,
        steps=250, per_device_batch=32, grad_accum=1, learning_rate=2e-4 / 32, warmup_steps=0, log_every=5,
        checkpoint_every=125, sample_every=125, num_validation_prompts=24, sample_steps=20, guidance_scale=5.0,
        generated_guidance_scale=2.0, reward_seeds=4,
    )


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return tyro.cli(Args, args=argv, default=toy_defaults(toy_model_in(argv)) if "--toy" in argv else None)


# ------------------------------------------------------------------------------------------- the algorithm
def sft_loss(model_pred: Tensor, target: Tensor, weights: Tensor, reg_pred: Tensor | None = None,
             reg_target: Tensor | None = None, reg_coef: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted denoising loss plus a squared-error regulariser, on common.kernels.stream_mse.

        loss = mean_n w_n·‖model_pred_n − target_n‖²  +  reg_coef · mean_m ‖reg_pred_m − reg_target_m‖²

    ‖·‖² is the mean over C, H, W, in float32. w = 1 without a regulariser is the official --sft loss
    (F.mse_loss(model_pred, ε)); w = w(r) is Lee et al.'s reward-weighted loss. The regulariser is --reg pretrain
    (reg_pred = ε_θ on the pre-training batch, reg_target = its noise ε') or --reg kl (reg_pred = model_pred,
    reg_target = ε_pre from the frozen pretrained UNet, without gradient).
    model_pred, target (N, C, H, W); weights (N,); reg_pred, reg_target (M, C, H, W).
    Returns (loss, per-image mse (N,), the regulariser before reg_coef (0-dim)).
    """
    mse = kernels.stream_mse(model_pred[None], target)[0]  # (N,)
    reg = kernels.stream_mse(reg_pred[None], reg_target)[0].mean() if reg_pred is not None else mse.new_zeros(())
    return (weights * mse).mean() + reg_coef * reg, mse, reg


def reward_weights(rewards: Tensor, weighting: str, quantile: float) -> Tensor:
    """w for the whole generated set, (N,) -> (N,), rescaled to mean 1. Only the ratios between images shape the
    objective's minimiser; the mean of 1 keeps the learning rate and --reg-coef on plain SFT's scale."""
    bad = int((~torch.isfinite(rewards)).sum())
    require(bad == 0, f"{bad} of the generated set's {len(rewards)} rewards are NaN or inf: the scorer's weights "
            "(--scorer, --scorer-path) are probably broken")
    if weighting == "raw":
        require(bool((rewards >= 0).all()), f"--weighting raw needs rewards >= 0, the set goes down to "
                f"{rewards.min():.4g}: a negative weight pushes away from an image without bound. Use minmax")
        w = rewards
    elif weighting == "minmax":
        w = (rewards - rewards.min()) / (rewards.max() - rewards.min()).clamp_min(1e-12)
    else:
        w = (rewards >= torch.quantile(rewards, quantile)).float()
    return w / w.mean()


# ------------------------------------------------------------------------------------------- data
class Images(torch.utils.data.Dataset):
    """Pair winners or {caption, image} rows, keyed by (epoch, index) -> {pixels (3, R, R) in [-1, 1], caption, weight,
    skipped}, flipped by that epoch's coin. An image that does not decode is replaced by the next good one (counted
    in `skipped`), so every rank's micro-batch stays full: an empty one would hang DDP."""

    def __init__(self, rows, resolution: int, random_flip: bool, seed: int, weights: Tensor | None = None):
        self.rows, self.resolution, self.random_flip, self.seed = rows, resolution, random_flip, seed
        self.weights = weights

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        epoch, index = key
        for skipped in range(len(self.rows)):
            i = (index + skipped) % len(self.rows)
            row = self.rows[i]
            caption, image = (row.caption, row.image_w) if isinstance(row, Pair) else (row["caption"], row["image"])
            try:
                image = decode_image(image)
            except Exception as e:  # any data error skips the image, logged and counted, never fatal
                logging.warning("image %d: does not decode, skipped (%s: %s)", i, type(e).__name__, e)
                continue
            flip = self.random_flip and flip_decision(flip_seed(self.seed, epoch), i, "w")  # redrawn every epoch
            return {"pixels": preprocess(image, self.resolution, flip), "caption": caption, "skipped": skipped,
                    "weight": 1.0 if self.weights is None else float(self.weights[i])}
        raise RuntimeError("no image in the data set decodes")


def collate(items: list[dict]) -> dict:
    return {"pixels": torch.stack([it["pixels"] for it in items]), "caption": [it["caption"] for it in items],
            "weight": torch.tensor([it["weight"] for it in items]), "skipped": sum(it["skipped"] for it in items)}


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], args: Args, autocast, guidance: float) -> Tensor:
    """Images (N, 3, H, W) in [0, 1], prompt i drawn with generator seed i, so runs and methods compare sample by
    sample."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for k in range(0, len(prompts), args.per_device_batch):
        with autocast():
            images.append(pipe(prompts[k:k + args.per_device_batch], num_inference_steps=args.sample_steps,
                               generator=[torch.Generator().manual_seed(s) for s in seeds[k:k + args.per_device_batch]],
                               guidance_scale=guidance, height=args.resolution, width=args.resolution,
                               output_type="pt").images.float().clamp(0, 1))
    return torch.cat(images)


def generated_set(args: Args, pipe, scorer, prompts: list[str], dist, autocast) -> Path:
    """Sample --num-images images from the pretrained model once, score them, and cache them; returns the folder.

    Image i: prompt i mod P, seed 10^6·(seed + 1) + i (never a grid seed 0, 1, ...), so the set does not depend on
    the number of GPUs; rank r draws images r, r + W, ... into part-<r>.parquet (index, caption, image as PNG,
    reward); meta.json, written last, marks the set complete. The set is written into a folder of this run's own and
    renamed into place when complete (atomic), so two runs with the same settings never write into one folder: if
    another run publishes the same set first, ours is discarded and theirs used. Training re-encodes the images with
    the VAE, as Lee et al. fine-tune on images: a sampled latent can lie far from the encoder's latent of its own
    decoded image (43 % relative distance on the toy model), and the UNet was trained on the encoder's latents.
    """
    # The key holds the bytes of the model and of the scorer, not their names: a reward model retrained into the same
    # --scorer-path must not reuse the old rewards (common.runtime.fingerprint, hashed once per run).
    key = dict(model=fingerprint(args.model, dist=dist), vae=fingerprint(args.vae, dist=dist) if args.vae else None,
               prompts=hashlib.sha256("\n".join(prompts).encode()).hexdigest(), seed=args.seed,
               num_images=args.num_images, sample_steps=args.sample_steps, guidance=args.generated_guidance_scale,
               resolution=args.resolution, mixed_precision=args.mixed_precision,
               scorer=scorer_fingerprint(args.scorer, args.scorer_path, args.clip_path, dist))
    folder = Path(args.generated_dir) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if (folder / "meta.json").exists() and json.loads((folder / "meta.json").read_text()) == key:  # verified
        logging.info("reusing the generated set in %s", folder)
        return folder
    token = [f"{os.getpid()}-{time.time_ns()}"]  # rank 0's, so every rank writes into the same private folder
    if dist.world_size > 1:
        tdist.broadcast_object_list(token, src=0)
    final, folder = folder, folder.with_name(f"{folder.name}.tmp-{token[0]}")
    if dist.is_main:
        folder.mkdir(parents=True)
    barrier()
    mine = list(range(dist.rank, args.num_images, dist.world_size))
    schema = pa.schema([("index", pa.int64()), ("caption", pa.string()), ("image", pa.binary()),
                        ("reward", pa.float32())])
    with pq.ParquetWriter(folder / f"part-{dist.rank:05d}.parquet", schema) as writer:
        for k in tqdm(range(0, len(mine), args.per_device_batch), desc="generated set", disable=not dist.is_main):
            index = mine[k:k + args.per_device_batch]
            captions = [prompts[i % len(prompts)] for i in index]
            images = generate(pipe, captions, [1_000_000 * (args.seed + 1) + i for i in index], args, autocast,
                              args.generated_guidance_scale)  # (b, 3, H, W)
            with torch.no_grad():
                rewards = scorer(images, captions).float().cpu()  # (b,)
            pixels = (images.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()  # (b, H, W, 3)
            pngs = [png_bytes(Image.fromarray(im)) for im in pixels]
            writer.write_table(pa.table(dict(index=index, caption=captions, image=pngs, reward=rewards.tolist()),
                                        schema))
    barrier()
    if dist.is_main:
        (folder / "meta.json").write_text(json.dumps(key, indent=2) + "\n")
        try:
            os.rename(folder, final)  # atomic; refused if `final` exists and is not empty
        except OSError:
            if not (final / "meta.json").exists() or json.loads((final / "meta.json").read_text()) != key:
                # an incomplete set left by an older version that crashed, or a stale key (a 16-hex-digit collision)
                shutil.rmtree(final)
                os.rename(folder, final)
            else:  # a concurrent run with the same settings published the same set first: use theirs
                logging.info("the generated set %s was completed by another run meanwhile; using it", final)
                shutil.rmtree(folder)
    barrier()
    return final


def load_generated(folder: Path) -> tuple[datasets.Dataset, Tensor]:
    """A cached set as memory-mapped rows {caption, image} in image-index order, and its rewards (N,)."""
    ds = datasets.load_dataset("parquet", data_files=sorted(map(str, folder.glob("part-*.parquet"))), split="train")
    order = ds.data.column("index").to_numpy().argsort()  # the parts hold every W-th image each
    rewards = torch.from_numpy(ds.data.column("reward").to_numpy()[order].astype("float32"))
    return ds.select(order).select_columns(["caption", "image"]), rewards


# ------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    dist = setup_distributed()
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(message)s")
    # ---- flags left at None take the recipe of --data
    micro = args.per_device_batch * dist.world_size  # images per micro-step, all GPUs together
    recipe = RECIPES[args.data]
    require(args.grad_accum is not None or recipe["batch"] % micro == 0, f"--per-device-batch "
            f"{args.per_device_batch} × {dist.world_size} GPUs does not divide the recipe's {recipe['batch']} images "
            "per step: set --grad-accum")
    recipe = {**recipe, "grad_accum": recipe["batch"] // micro, "generated_guidance_scale": args.guidance_scale,
              "dataset_source": str(getattr(toy_world(), args.dataset)) if args.toy else HUB_SOURCES[args.dataset]}
    args = dataclasses.replace(args, **{k: v for k, v in recipe.items() if getattr(args, k, 0) is None})
    out = [args.output_dir or f"runs/sft-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if dist.world_size > 1:
        tdist.broadcast_object_list(out, src=0)  # one timestamped folder for all ranks
    out = Path(out[0])
    check_model_path(args.model, "--model")  # before anything loads: a mistyped path fails in a second
    family, turbo = model_family(args.model), is_turbo(args.model)  # common/models.py: SD1.5 or SDXL, chosen once
    timesteps = turbo_timesteps if turbo else all_timesteps
    sdxl_base = family.name == "sdxl" and not turbo
    args = dataclasses.replace(args, resolution=args.resolution or (1024 if sdxl_base else 512),
                               optimizer=args.optimizer or ("adafactor" if family.name == "sdxl" else "adamw"))
    check_resolution(args.model, args.resolution)
    require(0 <= args.max_broken_fraction < 1,
            f"--max-broken-fraction must be in [0, 1), got {args.max_broken_fraction}")
    require(args.steps >= 1 and args.lora_rank >= 0, f"--steps must be >= 1 and --lora-rank >= 0: got {args.steps}, "
            f"{args.lora_rank}")
    require(args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}")
    require(args.reg_coef >= 0, f"--reg-coef must be >= 0, got {args.reg_coef}")
    require(0 <= args.prompt_dropout < 1, f"--prompt-dropout must be in [0, 1), got {args.prompt_dropout}")
    require(0 < args.binary_quantile < 1, f"--binary-quantile must be in (0, 1), got {args.binary_quantile}")
    require(min(args.log_every, args.checkpoint_every, args.sample_every) >= 1,
            "--log-every, --checkpoint-every and --sample-every must be >= 1")
    require(args.data == "preferred" or args.scorer != "none", "--data generated needs a --scorer to weigh its images")
    require(args.reg != "pretrain" or args.pretrain_data is not None, "--reg pretrain needs --pretrain-data")
    require(args.mixed_precision != "fp16" or dist.device.type == "cuda", "--mixed-precision fp16 needs a GPU")
    require(not args.resume or args.output_dir is not None, "--resume needs the --output-dir of the run to continue")
    prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, is_main=dist.is_main)
    images_per_step = batch_arithmetic(args.per_device_batch, dist.world_size, args.grad_accum)
    lr = args.learning_rate * images_per_step  # the official --scale_lr
    seed_everything(args.seed, dist.rank)

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
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device)
    make_pipe = functools.partial(make_pipeline, family, args.model, vae=vae, tokenizers=tokenizers,
                                  text_encoders=text_encoders,
                                  scheduler=ddim_sampler(noise_scheduler.config))
    scorer = None if args.scorer == "none" else load_scorer(args.scorer, args.scorer_path, clip_path=args.clip_path,
                                                            device=device, dtype=weight_dtype,
                                                            flags=("--scorer-path", "--clip-path"))
    prompts = load_prompts(args.prompts) if args.data == "generated" or args.num_validation_prompts else []
    grid_prompts = (load_prompts(args.validation_prompts) if args.validation_prompts else prompts)[
        :args.num_validation_prompts]

    # ---- data: the winners, or the generated set (sampled from the pretrained UNet, before anything trains it)
    if args.data == "generated":
        rows, rewards = load_generated(generated_set(args, make_pipe(unet=unet), scorer, prompts, dist, autocast))
        weights = reward_weights(rewards, args.weighting, args.binary_quantile)
        dataset = Images(rows, args.resolution, args.random_flip, args.seed, weights)
    else:
        pairs = load_pairs(args.dataset, args.dataset_source, args.split,  # winner first, ties dropped
                           max_broken=args.max_broken_fraction)
        dataset = Images(pairs, args.resolution, args.random_flip, args.seed)
    pretrain = None
    if args.reg == "pretrain":
        pretrain = Images(load_captioned_images(args.pretrain_data), args.resolution, args.random_flip, args.seed + 1)
    for name, data in (("the training set", dataset), ("--pretrain-data", pretrain)):
        require(data is None or len(data) >= micro, f"{name} has {len(data or [])} images, fewer than one micro-batch "
                f"of {micro} (--per-device-batch {args.per_device_batch} × {dist.world_size} GPUs)")
    if dist.is_main:
        what = f"winners of {args.dataset} {args.split}" if args.data == "preferred" else "images generated once"
        print(f"images per optimizer step = {args.per_device_batch} per GPU × {dist.world_size} GPUs × "
              f"{args.grad_accum} accumulation = {images_per_step}; learning rate = {args.learning_rate:g} × "
              f"{images_per_step} = {lr:g}, {args.warmup_steps} warm-up steps")
        print(f"{args.steps} steps × {images_per_step} = {args.steps * images_per_step:,} images = "
              f"{args.steps * images_per_step / len(dataset):.2f} epochs of {len(dataset):,} {what}; --reg {args.reg}"
              + (f" × {args.reg_coef:g}" if args.reg != "none" else ""))
        if args.data == "generated":
            print(f"rewards: mean {rewards.mean():.4g}, min {rewards.min():.4g}, max {rewards.max():.4g}; --weighting "
                  f"{args.weighting}: max weight {weights.max():.3g}, effective sample size (Σw)²/Σw² = "
                  f"{weights.sum() ** 2 / (weights ** 2).sum():.0f} of {len(weights)}")

    # ---- trained weights: LoRA (ε_pre = adapters off) or the whole UNet (ε_pre = a frozen copy, for --reg kl)
    ref_unet = None
    if args.lora_rank:  # as diffusers' LoRA example: frozen base in the autocast dtype, adapters in fp32
        unet.requires_grad_(False).to(dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        cast_training_params(unet, dtype=torch.float32)
    elif args.reg == "kl":
        ref_unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device, weight_dtype)
        ref_unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    if args.optimizer == "adafactor":  # official SDXL: no relative step or parameter scaling, update clipping 1.0
        optimizer = Adafactor(params, lr=lr, weight_decay=args.weight_decay, clip_threshold=1.0, scale_parameter=False,
                              relative_step=False)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")  # fp16 needs loss scaling
    gen = torch.Generator().manual_seed(args.seed)  # the loop's only random stream: t, ε, z, prompt dropout
    weights_name = "unet_lora" if args.lora_rank else "unet"

    start, skipped_total = 0, 0  # images replaced because they did not decode, over the whole run
    if args.resume:
        start, saved, extra = load_checkpoint(out, script="sft.py")
        require(len(extra["rng"]) == dist.world_size, f"the checkpoint was written by {len(extra['rng'])} "
                f"processes; resume with as many (this run has {dist.world_size})")
        check_resume_args(extra["args"], args)
        skipped_total = extra.get("skipped_images_total", 0)
        if args.lora_rank:
            set_peft_model_state_dict(unet, saved[weights_name])
        else:
            unet.load_state_dict(saved[weights_name])
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

    def loader(data, seed):
        keys = micro_batches(len(data), args.per_device_batch, dist.rank, dist.world_size, seed,
                             start=start * args.grad_accum)
        return iter(DataLoader(data, batch_sampler=keys, collate_fn=collate, num_workers=args.num_workers))

    batches = loader(dataset, args.seed)
    pretrain_batches = loader(pretrain, args.seed + 1_000_000) if pretrain is not None else None
    own = slice(dist.rank * args.per_device_batch, (dist.rank + 1) * args.per_device_batch)  # this rank's images

    def noisy(batch):
        """x_t, t, ε and the caption embeddings of a micro-batch. The randomness is drawn for the GLOBAL micro-batch
        from the generator every rank shares, and each rank keeps its rows: N GPUs train exactly as one process."""
        t = timesteps(torch.randint(0, noise_scheduler.config.num_train_timesteps, (micro,), generator=gen))
        t = t[own].to(device)
        pixels = batch["pixels"].to(device, weight_dtype)  # (B, 3, R, R)
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
        shape = (micro, *posterior.mean.shape[1:])
        noise = torch.randn(shape, generator=gen)[own].to(device)  # ε (B, 4, h, w)
        z = torch.randn(shape, generator=gen)[own].to(device, weight_dtype)
        drop = (torch.rand(micro, generator=gen) < args.prompt_dropout)[own]
        x_0 = ((posterior.mean + posterior.std * z) * vae.config.scaling_factor).float()  # latent_dist.sample()
        x_t = noise_scheduler.add_noise(x_0, noise, t)  # √ᾱ_t·x_0 + √(1−ᾱ_t)·ε
        with torch.no_grad():  # the family's text encoding (common/models.py), dropped captions as ""
            text = family.encode_text(["" if d else c for c, d in zip(batch["caption"], drop.tolist())], tokenizers,
                                      text_encoders)
        return x_t, t, noise, text

    def sample_grid(step: int) -> None:  # rank 0 only: fixed-seed samples of the current UNet, scored
        unet.eval()
        images = generate(make_pipe(unet=unet), grid_prompts, list(range(len(grid_prompts))), args, autocast,
                          args.guidance_scale)
        captions = grid_prompts
        if scorer is not None:
            with torch.no_grad():
                scores = scorer(images.to(device), grid_prompts).float().cpu()
            captions = [f"{p} [{s:.3g}]" for p, s in zip(grid_prompts, scores.tolist())]
            logger.log({"rewards/grid_mean": scores.mean(), "rewards/grid_std": scores.std()}, step)
        grid = save_image_grid(images, out / "samples" / f"step_{step:07d}.png", nrow=8, captions=captions,
                               upscale=max(1, 128 // args.resolution))
        logger.log_images("samples", grid, step)
        unet.train()

    if dist.is_main and start == 0 and grid_prompts:
        sample_grid(0)  # the base model, for comparison
    barrier()

    # ---- training loop: the algorithm
    unet.train()
    progress = tqdm(initial=start, total=args.steps, disable=not dist.is_main)
    clock, images_since = time.time(), 0
    for step in range(start + 1, args.steps + 1):
        totals = torch.zeros(5, device=device)  # means of loss, weighted mse, mse, reg; the count of skipped images
        for micro_step in range(args.grad_accum):
            batch = next(batches)
            x_t, t, noise, text = noisy(batch)
            if pretrain_batches is not None:  # the pre-training images ride in the same UNet call
                pre = next(pretrain_batches)
                x_t2, t2, noise2, text2 = noisy(pre)
                x_t, t = torch.cat([x_t, x_t2]), torch.cat([t, t2])
                text = torch.cat([text, text2]) if torch.is_tensor(text) else tuple(map(torch.cat, zip(text, text2)))
            inputs = family.unet_inputs(text, args.resolution)  # encoder_hidden_states (B, 77, D) [, SDXL's added]
            n = len(noise)
            ref_pred = None
            if args.reg == "kl":
                with torch.no_grad(), autocast(), reference_unet(unet, ref_unet) as pre_unet:
                    ref_pred = pre_unet(x_t, t, **inputs).sample  # ε_pre (B, 4, h, w)
            last = micro_step == args.grad_accum - 1
            with model.no_sync() if dist.world_size > 1 and not last else contextlib.nullcontext():
                with autocast():
                    pred = model(x_t, t, **inputs).sample  # (B [+ B], 4, h, w)
                model_pred = pred[:n]
                reg_pred, reg_target = None, None  # --reg none
                if args.reg == "pretrain":
                    reg_pred, reg_target = pred[n:], noise2  # ε_θ on the pre-training images against their noise
                elif args.reg == "kl":
                    reg_pred, reg_target = model_pred, ref_pred  # ε_θ against ε_pre at the same x_t
                loss, mse, reg = kernels.compiled(sft_loss, enabled=args.compile)(
                    model_pred, noise, batch["weight"].to(device), reg_pred, reg_target, args.reg_coef)
                scaler.scale(loss / args.grad_accum).backward()
            totals[:4] += torch.stack([loss, loss - args.reg_coef * reg, mse.mean(), reg]).detach() / args.grad_accum
            totals[4] += batch["skipped"] + (pre["skipped"] if pretrain_batches is not None else 0)
        stats = all_reduce_mean(totals, dist)  # over GPUs
        check_finite(stats[0], step, out)  # before the update: the last checkpoint stays the last good one
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr_now = lr_scheduler.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        images_since += images_per_step
        skipped_total += round(stats[4].item() * dist.world_size)  # every step, not only logged ones

        if step % args.log_every == 0 or step == 1:
            row = dict(zip(["losses/loss", "losses/weighted_mse", "losses/mse", "losses/reg"], stats[:4].tolist()))
            row.update({"charts/skipped_images": stats[4].item() * dist.world_size,
                        "charts/skipped_images_total": skipped_total, "charts/learning_rate": lr_now,
                        "charts/grad_norm": grad_norm.item(), "charts/images_seen": step * images_per_step,
                        "charts/epoch": step * images_per_step / len(dataset),
                        "charts/images_per_second": images_since / (time.time() - clock)})
            logger.log(row, step)
            progress.set_postfix(loss=f"{row['losses/loss']:.4f}")
            clock, images_since = time.time(), 0
        if step % args.checkpoint_every == 0 or step == args.steps:  # the last too, so --resume --steps extends
            weights = get_peft_model_state_dict(unet) if args.lora_rank else unet.state_dict()
            save_checkpoint(out, step, {weights_name: weights}, generators=[gen], script="sft.py", extra={
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict(), "args": args, "base_model": args.model,
                "skipped_images_total": skipped_total})
        if dist.is_main and grid_prompts and (step % args.sample_every == 0 or step == args.steps):
            sample_grid(step)
        barrier()
    progress.close()

    # ---- final weights in diffusers' format, then the base-vs-trained reward comparison (rank 0)
    summary = {}
    if dist.is_main:
        load = save_final(family, unet, args.lora_rank > 0, args.model, out)  # final/unet or final/lora
        if args.reward_seeds and scorer is not None and grid_prompts:
            unet.eval()
            if not args.lora_rank and ref_unet is None:  # loaded only now, so that it took no memory while training
                ref_unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device, weight_dtype)
            prompts_k = [p for _ in range(args.reward_seeds) for p in grid_prompts]
            seeds = list(range(len(prompts_k)))
            score = lambda u: scorer(generate(make_pipe(unet=u), prompts_k, seeds, args, autocast,  # noqa: E731
                                              args.guidance_scale).to(device), prompts_k).float().cpu()
            with torch.no_grad(), reference_unet(unet, ref_unet) as pre_unet:
                base = score(pre_unet)
            with torch.no_grad():
                final = score(unet)
            diff = (final - base).numpy()
            p_value = float(scipy.stats.wilcoxon(diff).pvalue) if diff.any() else 1.0
            summary = {"eval/reward_base": base.mean().item(), "eval/reward_final": final.mean().item(),
                       "eval/reward_win_rate": (final > base).float().mean().item(), "eval/reward_pvalue": p_value,
                       "eval/reward_samples": len(prompts_k),
                       "reward_prompts": grid_prompts,
                       "reward_test": "Wilcoxon signed-rank, two-sided, paired by prompt and seed"}
            logger.log({k: v for k, v in summary.items() if k.startswith("eval/")}, args.steps)
            print(f"{args.scorer} reward of fixed-seed samples: base {summary['eval/reward_base']:.4g} -> "
                  f"trained {summary['eval/reward_final']:.4g} (Wilcoxon p = {p_value:.2g}, {len(prompts_k)} samples)")
            if warning := below_base_warning(summary["eval/reward_final"], summary["eval/reward_base"],
                                             f"{args.scorer} reward"):
                summary["warning"] = warning
        summary["skipped_images_total"] = skipped_total
        (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"load the result with:\n    {load}")
    logger.close()
    barrier()
    cleanup_distributed()
    return summary


if __name__ == "__main__":
    main(parse_args())
