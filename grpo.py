"""GRPO for diffusion: group-relative policy optimisation over the denoising chain (DanceGRPO), SD1.5 and SDXL.

Docs (usage, logged metrics, implementation details with sources, toy results, tests): docs/grpo.md

Xue et al. 2025, "DanceGRPO: Unleashing GRPO on Visual Generation", https://arxiv.org/abs/2505.07818; official code
XueZeyue/DanceGRPO, fastvideo/train_grpo_sd.py with fastvideo/config_sd/dgx.py:hpsv2 (Stable Diffusion, HPS v2.1).
The optional KL term is Flow-GRPO's (Liu et al. 2025, https://arxiv.org/abs/2505.05470); the switch that drops the
division by the group's std is Dr. GRPO's (Liu et al. 2025, https://arxiv.org/abs/2503.20783).

Sampling with DDIM(η > 0) makes each denoising step a Gaussian policy π_θ(x_{t-1} | x_t, c) = N(μ_θ, σ_t² I)
(common/chain.py holds the chain and its equations, shared with dpok.py). For each prompt c, draw a group of G
trajectories x_T .. x_0 with the current policy (the old policy π_old, its log-probabilities recorded as drawn),
score each final image with r_i = r(x_0^i, c) and set the group-relative advantage, the same at every step:

    A_i = clip((r_i - mean_G r) / (std_G r + ε), -A_max, A_max)          (std over the group, unbiased; ε = 1e-8)

Then on K = ⌊(T - 1) · f⌋ timesteps chosen at random per trajectory (DanceGRPO's timestep fraction f; the last step
is never trained, as in the official code) maximise the clipped surrogate, i.e. descend

    L(θ) = mean_{i,t} [ max(-A_i · ρ_t^i, -A_i · clip(ρ_t^i, 1 - ε_c, 1 + ε_c)) ] + β · mean_{i,t} KL_t^i,
    ρ_t^i = π_θ(x_{t-1}^i | x_t^i, c) / π_old(x_{t-1}^i | x_t^i, c),
    KL_t  = KL(π_θ(· | x_t, c) ‖ π_ref(· | x_t, c)) = ‖μ_θ - μ_ref‖² / (2σ_t²)    (averaged over C, H, W)

No value network, no reward statistics across prompts. log π is the Gaussian log-density averaged over C·H·W, as in
DDPO's and DanceGRPO's code (common/kernels.py gaussian_log_prob). Before the first update θ = θ_old, so ρ = 1 on
every transition: DanceGRPO's own check (it prints the ratio), logged here as charts/first_ratio.

Paper symbol -> flag / variable:  G --group-size, ε_c --clip-range, A_max --adv-clip-max, f --timestep-fraction,
η --eta, w --guidance-scale, T --rollout-steps, β --kl-coef (0: DanceGRPO), the std division --advantage-std
(--no-advantage-std: Dr. GRPO), π_ref = the UNet with its LoRA off or a frozen copy (`reference_unet`), A = `adv`,
ρ = `ratio`, r = the --scorer.

Usage (the official SD recipe is the default; one GPU stands for one of its 8, see docs/grpo.md for the arithmetic):
    torchrun --nproc_per_node 8 grpo.py --prompts prompts.txt  # DanceGRPO SD: HPS v2.1, G 16, full fine-tune
    (prompts.txt: DanceGRPO's assets/prompts.txt, the HPDv2 training prompts; 'partiprompts' is the default here)
    python grpo.py --lora-rank 4 --scorer imagereward --prompts partiprompts   # one GPU, LoRA, another reward
    python grpo.py --model stabilityai/stable-diffusion-xl-base-1.0 --lora-rank 8 --gradient-checkpointing  # SDXL
    python grpo.py --toy                                       # the offline toy world on a CPU, a few minutes
"""

import contextlib
import dataclasses
import json
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
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from tqdm import tqdm

from common import chain, kernels, runtime
from common.data import load_prompts
from common.models import SDXL, ddim_sampler, load_text_encoders, load_vae, make_pipeline, model_family, save_final
from common.runtime import reference_unet, require
from common.scorers import load_scorer


@dataclasses.dataclass
class Args:
    # ---- model, prompts, reward
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """base model: hub id or local SD1.5 or SDXL pipeline folder (official: CompVis/stable-diffusion-v1-4, the same
    architecture)"""
    prompts: str = "partiprompts"
    """training prompts: a text file (one per line), .json list, parquet, HPSv2 folder, 'partiprompts' or 'pickapic'
    (official: DanceGRPO's assets/prompts.txt, the HPDv2 training prompts, not on the hub)"""
    scorer: Literal["hps", "imagereward", "pickscore", "aesthetic", "clip", "reward-model", "toy"] = "hps"
    """r(x0, c) from common/scorers.py (official: 'hps', HPS v2.1)"""
    scorer_path: str | None = None
    """the reward's weights: HPS_v2.1_compressed.pt or its folder ('hps'), ImageReward.pt or its folder, the head file
    ('aesthetic'), reward_model.py's output folder ('reward-model'), a copy of the model ('clip', 'pickscore'); None
    downloads the hub default where there is one"""
    clip_path: str | None = None
    """the reward's processor or backbone (None: the scorer's default)"""
    # ---- the method
    group_size: int = 16
    """G, trajectories per prompt; the advantage is relative to the group (official num_generations: 16)"""
    advantage_std: bool = True
    """divide by the group's std (GRPO, official); --no-advantage-std keeps r - mean_G r (Dr. GRPO)"""
    adv_clip_max: float = 5.0
    """A_max: advantages clipped to ±A_max (official adv_clip_max: 5)"""
    clip_range: float = 1e-4
    """ε_c of the ratio clip (official clip_range: 1e-4)"""
    timestep_fraction: float = 1.0
    """f: each trajectory trains on K = ⌊(T - 1)·f⌋ of its steps, drawn at random (official: 1.0, all but the last)"""
    kl_coef: float = 0.0
    """β of the KL to the frozen reference (DanceGRPO: none, 0; Flow-GRPO uses one); 0 skips the reference pass"""
    # ---- sampling (the policy's trajectories)
    rollout_steps: int = 50
    """T, DDIM steps per trajectory (official sample.num_steps: 50)"""
    eta: float = 1.0
    """η of DDIM, > 0 so every step has a density (official: 1.0)"""
    guidance_scale: float = 5.0
    """w, classifier-free guidance in sampling and in the policy's log-probability (official: 5.0, train.cfg on)"""
    shared_init_noise: bool = True
    """the G trajectories of a group start from one x_T, so they differ only by the steps' noise (official: one x_T for
    every trajectory of the iteration on a GPU; here one per group)"""
    sample_batch: int = 4
    """prompts per iteration per GPU, G trajectories each (official sample.batch_size: 4; x 8 GPUs x 16 = 512)"""
    resolution: int | None = None
    """image side in pixels (None: the family's, 512 for SD1.5, 1024 for SDXL)"""
    # ---- the policy update
    per_device_batch: int = 4
    """trajectories per forward pass per GPU, one timestep at a time (official train.batch_size: 4)"""
    grad_accum: int = 8
    """micro-batches of trajectories per optimizer step, each over its K timesteps (official: 8; so 4 x 8 GPUs x 8 =
    256 trajectories per step and 2 steps per iteration)"""
    learning_rate: float = 1e-5
    """AdamW learning rate, constant (official: 1e-5)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (official: 1e-4); betas (0.9, 0.999), eps 1e-8"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (official: 1.0)"""
    lora_rank: int = 0
    """LoRA rank on the attention projections; 0 fine-tunes the whole UNet (official use_lora: False)"""
    steps: int = 600
    """optimizer steps; sample_batch·G / (per_device_batch·grad_accum) per iteration (official: 300 epochs x 2)"""
    # ---- engineering
    seed: int = 0
    """seeds everything; rank r uses seed + r"""
    output_dir: str | None = None
    """run folder (default runs/grpo-<time>): args.json, metrics.jsonl, tb/, checkpoints/, samples/, final/, eval.json"""
    resume: bool = False
    """continue the run in --output-dir exactly (weights, optimizer, RNG streams)"""
    overwrite: bool = False
    """start afresh in a non-empty --output-dir, deleting the previous run's outputs (refused without this flag)"""
    checkpoint_every: int = 40
    """optimizer steps between checkpoints, a multiple of the steps per iteration (official save_freq: 20 iterations)"""
    sample_every: int = 40
    """optimizer steps between fixed-seed validation grids and rewards/eval_mean, a multiple of the steps per iteration"""
    num_validation_prompts: int = 8
    """validation images: the first prompts of --validation-prompts (cycled), image k from its own generator seeded k"""
    validation_prompts: str | None = None
    """prompt set of the validation images and eval.json (common.data.load_prompts; None: --prompts)"""
    sample_steps: int = 50
    """DDIM steps (η = 0, evaluate.py's sampler) of the final base-vs-trained comparison in eval.json; the grids and
    rewards/eval_mean use the policy's own sampler (--rollout-steps, --eta)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    """autocast dtype over fp32 trainable weights (official: bf16); CPUs take 'no' or 'bf16'"""
    gradient_checkpointing: bool = False
    """recompute UNet activations in the backward pass: less memory, more time"""
    compile: bool = False
    """torch.compile the loss and log-probability kernels (common/kernels.py); eager is the reference"""
    toy: bool = False
    """run on the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""


def toy_defaults() -> Args:
    """--toy: the toy world, its 12 training prompts and CPU-sized settings (a few minutes on 2 CPU cores).

    6 prompts x G 8 = 48 images per iteration (as dpok.py --toy), 5 DDIM steps of which the first 4 train, two
    optimizer steps of 24 trajectories each, 24 iterations (1,152 images). A full fine-tune at lr 1e-4; the validation
    images and eval.json use the toy VALIDATION prompts, never trained on. Chosen there on seeds 0, 1 and 3: 12
    iterations at lr 3e-4 (seed 0's choice) lowered the validation reward on seeds 1 and 3, where 24 at 1e-4 raised it;
    docs/grpo.md gives the runs and the confirmation on fresh seeds.
    """
    from common.toy import PROMPT_FILES, toy_world

    world = toy_world()
    return Args(toy=True, model=str(world.pipeline), prompts=str(PROMPT_FILES["train"]), scorer="toy",
                validation_prompts=str(PROMPT_FILES["validation"]), resolution=world.resolution, mixed_precision="no", rollout_steps=5,
                group_size=8, sample_batch=6, per_device_batch=12, grad_accum=2, learning_rate=1e-4, steps=48,
                checkpoint_every=24, sample_every=12, num_validation_prompts=48, sample_steps=20)


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return tyro.cli(Args, args=argv, default=toy_defaults() if "--toy" in argv else None)


# ------------------------------------------------------------------------------------------------ the method


def group_advantages(rewards, group_size: int, std: bool = True, adv_clip_max: float = 5.0, eps: float = 1e-8):
    """A_i = clip((r_i - mean_G r) / (std_G r + ε), ±A_max) within each group of G consecutive rewards; std=False
    (Dr. GRPO) leaves out the division. std is the unbiased one (torch's default, as the official code).
    rewards (P·G,) with each prompt's G rewards consecutive -> (P·G,)."""
    r = rewards.float().view(-1, group_size)  # (P, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.clamp(-adv_clip_max, adv_clip_max).flatten()


def grpo_loss(log_prob, old_log_prob, adv, kl, clip_range: float, kl_coef: float):
    """GRPO's clipped surrogate on a batch of transitions, plus β·KL.

        ρ = exp(log π_θ - log π_old)                                                       (B,)
        L = mean[max(-A · ρ, -A · clip(ρ, 1 - ε_c, 1 + ε_c))] + β · mean[KL]

    The max picks the pessimistic side: the gradient is -A·∇ρ unless ρ has left 1 ± ε_c in A's favour, where it is 0.
    log_prob, old_log_prob, adv, kl: (B,). Returns (loss, policy_loss, clip_frac, approx_kl), approx_kl =
    mean[(ρ - 1) - log ρ] (http://joschu.net/blog/kl-approx.html).
    """
    log_ratio = log_prob - old_log_prob  # (B,)
    ratio = torch.exp(log_ratio)
    policy = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))  # (B,)
    policy_loss = policy.mean()
    loss = policy_loss + kl_coef * kl.mean()
    clip_frac = ((ratio - 1).abs() > clip_range).float().mean()
    approx_kl = ((ratio - 1) - log_ratio).mean()
    return loss, policy_loss, clip_frac, approx_kl


def trained_steps(num_trajectories: int, rollout_steps: int, fraction: float, gen) -> torch.Tensor:
    """Which steps each trajectory trains on: the first K = ⌊(T - 1)·f⌋ of a random permutation of its steps
    0 .. T - 2 (the official code drops the last step, then shuffles per trajectory). -> (N, K) step indices."""
    k = int((rollout_steps - 1) * fraction)
    return torch.stack([torch.randperm(rollout_steps - 1, generator=gen)[:k] for _ in range(num_trajectories)])


# ------------------------------------------------------------------------------------------------ helpers


def cat_text(a, b):
    """Stack two text conditionings row-wise: SD1.5's tensor, or SDXL's (hidden, pooled) pair."""
    return tuple(torch.cat([x, y]) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.cat([a, b])


def select(cond: dict, rows: torch.Tensor) -> dict:
    """Rows of the UNet's keyword inputs (SDXL's added_cond_kwargs included)."""
    return {k: {n: x[rows] for n, x in v.items()} if isinstance(v, dict) else v[rows] for k, v in cond.items()}


def null_text(model: str, family, tokenizers, text_encoders):
    """The unconditional branch of guidance: the empty prompt's encoding; zeros for an SDXL whose pipeline config says
    force_zeros_for_empty_prompt (SDXL base does), as its pipeline samples."""
    with torch.no_grad():
        text = family.encode_text([""], tokenizers, text_encoders)
    if family is SDXL and family.pipeline_class.load_config(model).get("force_zeros_for_empty_prompt", True):
        text = tuple(torch.zeros_like(x) for x in text)
    return text


# ------------------------------------------------------------------------------------------------ main


def main(args: Args) -> Path:
    dist = runtime.setup_distributed()
    device = dist.device
    # ---- guard rails: reject what cannot work before loading anything
    runtime.check_model_path(args.model, "--model")
    family = model_family(args.model)  # common/models.py: SD1.5 or SDXL, chosen once from the UNet's config
    args = dataclasses.replace(args, resolution=args.resolution or family.resolution)
    T, G = args.rollout_steps, args.group_size
    K = int((T - 1) * args.timestep_fraction)  # trained steps per trajectory
    N = args.sample_batch * G  # trajectories per iteration per GPU
    require(G >= 2, f"--group-size must be >= 2 (a group of one has no relative advantage), got {G}")
    require(T >= 2, f"--rollout-steps must be >= 2 (the last step is never trained), got {T}")
    require(0 < args.timestep_fraction <= 1 and K >= 1, f"--timestep-fraction {args.timestep_fraction} must be in "
            f"(0, 1] and leave at least one of the {T - 1} trainable steps")
    require(0 < args.eta <= 1, f"--eta must be in (0, 1] so each transition has a density, got {args.eta}")
    require(args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}")
    require(args.clip_range > 0 and args.adv_clip_max > 0, "--clip-range and --adv-clip-max must be > 0")
    require(args.kl_coef >= 0, f"--kl-coef must be >= 0, got {args.kl_coef}")
    require(args.guidance_scale >= 1, f"--guidance-scale must be >= 1, got {args.guidance_scale}")
    require(min(args.sample_batch, args.per_device_batch, args.grad_accum, args.steps, args.num_validation_prompts)
            >= 1, "--sample-batch, --per-device-batch, --grad-accum, --steps, --num-validation-prompts must be >= 1")
    per_step = args.per_device_batch * args.grad_accum  # trajectories per optimizer step per GPU
    require(N % per_step == 0, f"--sample-batch {args.sample_batch} x --group-size {G} = {N} trajectories per GPU must "
            f"be a multiple of --per-device-batch {args.per_device_batch} x --grad-accum {args.grad_accum} = {per_step}")
    steps_per_iter = N // per_step
    for flag, value in (("--steps", args.steps), ("--checkpoint-every", args.checkpoint_every),
                        ("--sample-every", args.sample_every)):
        require(value >= 1 and value % steps_per_iter == 0, f"{flag} {value} must be a positive multiple of the "
                f"{steps_per_iter} optimizer steps each iteration takes ({N} trajectories / {per_step} per step)")
    iterations = args.steps // steps_per_iter
    require(args.scorer not in ("reward-model", "aesthetic") or (args.scorer_path and Path(args.scorer_path).exists()),
            f"--scorer {args.scorer} needs --scorer-path (got {args.scorer_path!r}, which does not exist)")
    require(args.scorer_path is None or Path(args.scorer_path).exists(),
            f"--scorer-path {args.scorer_path!r} does not exist (--scorer {args.scorer})")
    require(device.type == "cuda" or args.mixed_precision != "fp16", "--mixed-precision fp16 needs a GPU; use bf16, no")
    require(not args.resume or args.output_dir is not None, "--resume needs the --output-dir of the run to continue")
    runtime.seed_everything(args.seed, dist.rank)
    if args.output_dir is None:  # rank 0's clock, so every rank writes to the same folder
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if tdist.is_initialized():
            tdist.broadcast_object_list(stamp, src=0)
        args = dataclasses.replace(args, output_dir=f"runs/grpo-{stamp[0]}")
    out = runtime.prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                                     is_main=dist.is_main)

    # ---- models: frozen VAE and text encoders; the UNet with LoRA (or full, against a frozen copy when β > 0)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no")
    tokenizers, text_encoders = load_text_encoders(args.model, family, device, weight_dtype)
    vae = load_vae(args.model, None, device, torch.float32)  # decoded for the reward in fp32: SDXL's VAE overflows fp16
    scheduler = ddim_sampler(DDIMScheduler.load_config(args.model, subfolder="scheduler"))  # SDXL ships Euler's
    require(scheduler.config.prediction_type == "epsilon",
            f"{args.model}: prediction_type {scheduler.config.prediction_type!r}; the DDIM step needs 'epsilon'")
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device)
    ref_unet = None
    if args.lora_rank > 0:  # as diffusers' LoRA example: frozen base in the autocast dtype, adapters in fp32
        unet.requires_grad_(False).to(dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        cast_training_params(unet, dtype=torch.float32)
    else:  # a full fine-tune keeps a frozen copy as π_ref: the KL term and the final comparison both need it
        ref_unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device, weight_dtype)
        ref_unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    ddp = dict(device_ids=[dist.local_rank]) if device.type == "cuda" else {}
    policy = torch.nn.parallel.DistributedDataParallel(unet, **ddp) if dist.world_size > 1 else unet
    log_prob_fn = kernels.compiled(kernels.gaussian_log_prob, args.compile)
    kl_fn = kernels.compiled(kernels.gaussian_kl, args.compile)
    loss_fn = kernels.compiled(grpo_loss, args.compile)
    sched = chain.ddim_schedule(scheduler, T, device)  # (timesteps, ᾱ_t, ᾱ_{t-1}), each (T,)
    side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (unet.config.in_channels, side, side)  # (4, 64, 64) at 512 px

    prompts = load_prompts(args.prompts)
    require(len(prompts) > 0 and all(prompts), f"--prompts {args.prompts}: no prompts")
    scorer = load_scorer(args.scorer, args.scorer_path, clip_path=args.clip_path, device=device,
                         dtype=weight_dtype, flags=("--scorer-path", "--clip-path"))
    uncond = null_text(args.model, family, tokenizers, text_encoders)  # (1, 77, D) [, (1, P)]

    @torch.no_grad()
    def conditioning(captions: list[str]) -> dict:
        """The UNet's inputs for [uncond; cond] of these captions (2N rows)."""
        text = family.encode_text(captions, tokenizers, text_encoders)
        null = tuple(x.expand(len(captions), *x.shape[1:]) for x in uncond) if isinstance(uncond, tuple) \
            else uncond.expand(len(captions), -1, -1)
        return family.unet_inputs(cat_text(null, text), args.resolution)

    val_prompts = load_prompts(args.validation_prompts) if args.validation_prompts else prompts
    require(len(val_prompts) > 0, f"--validation-prompts {args.validation_prompts}: no prompts")
    val_prompts = [val_prompts[i % len(val_prompts)] for i in range(args.num_validation_prompts)]  # the first, cycled
    val_cond = conditioning(val_prompts)

    @torch.no_grad()
    def validate(model, with_kl: bool = False):
        """The fixed-seed validation images with the policy's sampler: image k from a generator seeded k.
        Returns (images, rewards (K,), KL to π_ref summed over steps (K,))."""
        gens = [torch.Generator().manual_seed(k) for k in range(len(val_prompts))]
        noise = lambda shape: torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)  # noqa: E731
        latents, _, kl = chain.sample_trajectories(model, val_cond, sched, noise((len(gens), *latent_shape)), args.eta,
                                                   args.guidance_scale, noise, autocast, ref_unet, with_kl)
        images = chain.decode(vae, latents[-1])
        return images, scorer(images, val_prompts).float(), kl

    # ---- state that a checkpoint carries: weights, optimizer, RNG streams
    gen = torch.Generator().manual_seed(args.seed + dist.rank)  # prompt choice and trained steps
    noise_gen = torch.Generator(device).manual_seed(args.seed + dist.rank)  # sampling noise
    start = 0
    if args.resume:
        done_steps, weights, extra = runtime.load_checkpoint(out, script="grpo.py")
        start = done_steps // steps_per_iter
        runtime.check_resume_args(extra["args"], args)
        missing = {n for n, p in unet.named_parameters() if p.requires_grad} - set(weights["policy"])
        require(not missing, f"--resume {out}: the checkpoint lacks {len(missing)} trainable tensors "
                f"(e.g. {next(iter(missing), '')}); was it saved with another --lora-rank?")
        unet.load_state_dict(weights["policy"], strict=False)
        optimizer.load_state_dict(extra["optimizer"])
        scaler.load_state_dict(extra["scaler"])
        runtime.set_rng_state(extra["rng"][dist.rank], generators=[gen, noise_gen])
    if dist.is_main:
        runtime.write_args(out, args)
    logger = runtime.MetricsLogger(out, enabled=dist.is_main, resume_step=start * steps_per_iter if args.resume else None)

    if dist.is_main:
        print(f"GRPO ({family.pipeline_class.__name__}, {args.resolution} px): {dist.world_size} GPU(s) x "
              f"{args.sample_batch} prompts x G {G} = {N * dist.world_size} trajectories of {T} DDIM(η {args.eta:g}) "
              f"steps per iteration; each trains {K} of its first {T - 1} steps\n"
              f"update: {steps_per_iter} optimizer steps/iteration x ({args.per_device_batch} trajectories x "
              f"{args.grad_accum} accumulation x {dist.world_size} GPUs = {per_step * dist.world_size} trajectories, "
              f"{per_step * dist.world_size * K} transitions); lr {args.learning_rate:g}, "
              f"{sum(p.numel() for p in params):,} trainable parameters "
              f"({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full UNet'})\n"
              f"{iterations} iterations: {iterations * N * dist.world_size:,} images, {args.steps:,} optimizer steps; "
              f"ε_c={args.clip_range:g} A_max={args.adv_clip_max:g} β={args.kl_coef:g} "
              f"advantage={'(r - mean)/std' if args.advantage_std else 'r - mean (Dr. GRPO)'} "
              f"shared x_T={args.shared_init_noise}")

    def save_samples(step: int) -> None:
        images, rewards, _ = validate(unet)
        captions = [f"{p[:40]} {r:.2f}" for p, r in zip(val_prompts, rewards.tolist())]
        grid = runtime.save_image_grid(images, out / "samples" / f"step_{step:07d}.png", nrow=8, captions=captions,
                                       upscale=max(1, 128 // images.shape[-1]))
        logger.log_images("samples", grid, step)
        logger.log({"rewards/eval_mean": rewards.mean()}, step)

    if start == 0 and dist.is_main:
        save_samples(0)  # the base model's grid and reward
    for it in tqdm(range(start, iterations), initial=start, total=iterations, disable=not dist.is_main):
        t0 = time.time()
        # ---------------- 1. a group of G trajectories per prompt from the current policy (= π_old), log π recorded
        idx = torch.randint(len(prompts), (args.sample_batch,), generator=gen)  # (P,) prompts of this GPU
        batch_prompts = [prompts[i] for i in idx.tolist() for _ in range(G)]  # (N,) each prompt's group consecutive
        cond = conditioning(batch_prompts)  # 2N rows
        noise = lambda shape: torch.randn(shape, generator=noise_gen, device=device)  # noqa: E731
        x_T = noise((args.sample_batch, 1, *latent_shape)).expand(-1, G, -1, -1, -1).flatten(0, 1) \
            if args.shared_init_noise else noise((N, *latent_shape))  # (N, 4, h, w)
        latents, log_probs = [], []
        unet.eval()
        for rows in torch.arange(N).split(args.per_device_batch):  # sampled in micro-batches: the memory of one pass
            part = select(cond, torch.cat([rows, rows + N]))  # their [uncond; cond] rows
            lat, lp, _ = chain.sample_trajectories(unet, part, sched, x_T[rows], args.eta, args.guidance_scale, noise,
                                                   autocast)
            latents.append(lat)
            log_probs.append(lp)
        latents, log_probs = torch.cat(latents, dim=1), torch.cat(log_probs, dim=1)  # (T+1, N, ..), (T, N)
        with torch.no_grad():
            rewards = torch.cat([scorer(chain.decode(vae, latents[-1][rows]), [batch_prompts[i] for i in rows])
                                 for rows in torch.arange(N).split(args.per_device_batch)]).float().to(device)  # (N,)
        adv = group_advantages(rewards, G, args.advantage_std, args.adv_clip_max)  # (N,) the groups are on this rank
        all_rewards = runtime.gather(rewards, dist)
        steps_of = trained_steps(N, T, args.timestep_fraction, gen).to(device)  # (N, K)

        # ---------------- 2. the policy: the clipped surrogate on K steps of every trajectory, in the sampled order
        unet.train()
        sums = dict.fromkeys(["loss", "policy_loss", "kl", "clip_frac", "approx_kl", "ratio", "grad_norm"], 0.0)
        first_ratio = None
        micro = torch.arange(N, device=device).split(args.per_device_batch)
        for s in range(steps_per_iter):
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for m, rows in enumerate(micro[s * args.grad_accum:(s + 1) * args.grad_accum]):
                part = select(cond, torch.cat([rows, rows + N]))
                for j in range(K):
                    step = steps_of[rows, j]  # (B,) each trajectory's own step
                    x_t, x_prev = latents[step, rows], latents[step + 1, rows]  # (B, 4, h, w)
                    t, ab_t, ab_prev = (x[step] for x in sched)
                    ab_t, ab_prev = ab_t.view(-1, 1, 1, 1), ab_prev.view(-1, 1, 1, 1)
                    last = m == args.grad_accum - 1 and j == K - 1
                    with contextlib.nullcontext() if last or dist.world_size == 1 else policy.no_sync():
                        with autocast:
                            eps = chain.guided_eps(policy, x_t, t, part, args.guidance_scale)
                        mean, std = chain.ddim_transition(eps, x_t, ab_t, ab_prev, args.eta)
                        log_prob = log_prob_fn(x_prev, mean, std)  # (B,)
                        kl = torch.zeros_like(log_prob)
                        if args.kl_coef > 0:
                            with torch.no_grad(), autocast, reference_unet(unet, ref_unet) as ref:
                                eps_ref = chain.guided_eps(ref, x_t, t, part, args.guidance_scale)
                            kl = kl_fn(mean, chain.ddim_transition(eps_ref, x_t, ab_t, ab_prev, args.eta)[0], std)
                        old = log_probs[step, rows]
                        loss, policy_loss, clip_frac, approx_kl = loss_fn(log_prob, old, adv[rows], kl,
                                                                          args.clip_range, args.kl_coef)
                        scaler.scale(loss / (args.grad_accum * K)).backward()
                    ratio = (log_prob.detach() - old).exp()
                    if first_ratio is None:
                        first_ratio = ratio.mean()  # before any update of this iteration: 1 up to rounding
                    step_loss += loss.detach() / (args.grad_accum * K)
                    for name, v in zip(sums, (loss, policy_loss, kl.mean(), clip_frac, approx_kl, ratio.mean())):
                        sums[name] += v.detach() / (args.grad_accum * K * steps_per_iter)
            done = it * steps_per_iter + s + 1
            runtime.check_finite(runtime.all_reduce_mean(step_loss, dist), done, out)  # all ranks stop together
            scaler.unscale_(optimizer)
            sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) / steps_per_iter
            scaler.step(optimizer)
            scaler.update()

        # ---------------- logging, samples, checkpoints
        done = (it + 1) * steps_per_iter
        names = {"loss": "losses/loss", "policy_loss": "losses/policy_loss", "kl": "losses/kl"}
        metrics = {names.get(k, f"charts/{k}"): runtime.all_reduce_mean(v, dist) for k, v in sums.items()}
        group_std = all_rewards.view(-1, G).std(dim=1)  # (P·GPUs,)
        metrics |= {"rewards/mean": all_rewards.mean(), "rewards/std": all_rewards.std(),
                    "rewards/group_std": group_std.mean(),  # the within-group spread the advantages come from
                    "charts/zero_std_groups": (group_std == 0).float().mean(),  # groups that teach nothing
                    "charts/first_ratio": runtime.all_reduce_mean(first_ratio, dist),
                    "charts/learning_rate": optimizer.param_groups[0]["lr"],
                    "charts/images": (it + 1) * N * dist.world_size, "charts/seconds_per_iteration": time.time() - t0}
        logger.log(metrics, done)
        if dist.is_main and (done % args.sample_every == 0 or done == args.steps):
            save_samples(done)
        if done % args.checkpoint_every == 0 or done == args.steps:
            trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
            extra = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "args": args,
                     "base_model": args.model}
            runtime.save_checkpoint(out, done, {"policy": trainable}, extra, generators=[gen, noise_gen],
                                    script="grpo.py")

    # ---- final weights in diffusers format, and the fixed-seed comparison with the base model
    if dist.is_main:
        unet.eval()
        load = save_final(family, unet, args.lora_rank > 0, args.model, out)
        _, final_policy, kl = validate(unet, with_kl=True)
        # The comparison itself with evaluate.py's sampler (DDIM --sample-steps, η = 0, image k seeded k), so that
        # eval.json and evaluate.py agree on the same model.
        pipe = make_pipeline(family, args.model, unet, vae, tokenizers, text_encoders,
                             DDIMScheduler.from_config(scheduler.config))
        pipe.set_progress_bar_config(disable=True)

        @torch.no_grad()
        def rewards_of(model):  # (num_val,)
            pipe.unet = model
            with autocast:
                images = pipe(val_prompts, num_inference_steps=args.sample_steps, eta=0.0, output_type="pt",
                              guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                              generator=[torch.Generator().manual_seed(k) for k in range(len(val_prompts))]).images
            return scorer(images.float().to(device), val_prompts).float().cpu()

        final = rewards_of(unet)
        with reference_unet(unet, ref_unet) as ref:
            base = rewards_of(ref)
        p_value = scipy.stats.ttest_rel(final, base, alternative="greater").pvalue  # one-sided, paired
        result = dict(reward_base=base.mean().item(), reward_final=final.mean().item(), p_value=float(p_value),
                      kl_final=kl.mean().item(), rewards_base=base.tolist(), rewards_final=final.tolist(),
                      reward_final_policy_sampler=final_policy.mean().item(), kl_per_image=kl.tolist(),
                      num_validation_prompts=args.num_validation_prompts, validation_prompts=val_prompts,
                      steps=args.steps, sample_steps=args.sample_steps, eta=0.0)
        print(f"fixed-seed reward (DDIM {args.sample_steps} steps, η 0): base {result['reward_base']:.4f} -> final "
              f"{result['reward_final']:.4f} (paired t-test p = {p_value:.2g}); KL to the base {result['kl_final']:.4g}"
              f"\nload with:\n    {load}")
        if warning := runtime.below_base_warning(result["reward_final"], result["reward_base"]):
            result["warning"] = warning
        (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.close()
    runtime.barrier()
    runtime.cleanup_distributed()
    return out


if __name__ == "__main__":
    main(parse_args())
