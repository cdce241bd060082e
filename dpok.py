"""DPOK: online reinforcement learning with KL regularisation for text-to-image diffusion (and the switches for DDPO).

Docs (usage, logged metrics, implementation details with sources, toy results, tests): docs/dpok.md

Fan et al. 2023, "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models",
https://arxiv.org/abs/2305.16381; official code: google-research/google-research/dpok (train_online_pg.py).

Sampling with DDIM(η) is a T-step decision process whose policy is the Gaussian transition
    p_θ(x_{t-1} | x_t, z) = N(μ_θ, σ_t² I)
    σ_t = η · √((1 - ᾱ_{t-1}) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_{t-1}))
    x̂₀  = (x_t - √(1 - ᾱ_t) · ε̂) / √ᾱ_t
    μ_θ = √ᾱ_{t-1} · x̂₀ + √(1 - ᾱ_{t-1} - σ_t²) · ε̂,      ε̂ = ε_θ(x_t, ∅) + w · (ε_θ(x_t, z) - ε_θ(x_t, ∅))
and the reward r(x₀, z) arrives at the end. DPOK minimises
    E_z[ -α · E[r(x₀, z)] + β · Σ_t E[ KL(p_θ(x_{t-1} | x_t, z) ‖ p_pre(x_{t-1} | x_t, z)) ] ]
by sampling trajectories with the current policy into a replay buffer and descending, on replayed transitions,
    L = -α · A · clamp(ρ, 1 - ε, 1 + ε) + β · KL_t,     ρ = exp(log p_θ(x_{t-1}|x_t) - log p_old(x_{t-1}|x_t)),
    A = r - V(x_t, z, t)  (a value net fitted to r by MSE),   KL_t = mean (ε̂_θ - ε̂_pre)²  (the official code's form).
log p is the Gaussian log-density averaged (not summed) over C, H, W, as in both official codes: a sum over 4·64·64
dims overflows ρ. The clamp has zero gradient outside 1 ± ε, so stale transitions stop contributing.

Paper symbol -> flag / variable:  α --reward-coef, β --kl-coef, ε --clip-range, w --guidance-scale, η --eta,
T --rollout-steps, p_pre = the same UNet with its LoRA adapters disabled (`reference_unet`), V = `ValueNet`, A = `adv`.

DDPO (Black et al. 2023, https://arxiv.org/abs/2305.13301) is this loop with no KL, PPO's clipped objective
max(-A·ρ, -A·clip(ρ, 1 ± ε)) and advantages normalised per prompt with running statistics (clipped to ±5):
    python dpok.py --kl-coef 0 --clip ppo --advantage per-prompt --reward-coef 1 --clip-range 1e-4
(ddpo-pytorch's defaults are also --learning-rate 3e-4 --max-grad-norm 1 --guidance-scale 5; its on-policy inner
epoch is --buffer-size = sample-batch x rollout-steps with policy-steps x grad-accum x policy-batch equal to that number.)

Usage (the official README's two runs, ImageReward as the reward; flags equal to the defaults are left out):
    python dpok.py --scorer imagereward --prompt "A green colored rabbit."   # single prompt, 1 GPU: α 10, β 0.01
    torchrun --nproc_per_node <GPUs> dpok.py --scorer imagereward --prompts data_meta.json --reward-coef 1000 \
        --kl-coef 0.1 --policy-batch 2 --sample-batch 6 --steps 100000  # multi-prompt: DPOK's DrawBench prompts
    (data_meta.json: google-research dpok/dataset/drawbench/, a dict keyed by prompt; the README does not say on how
    many GPUs it ran. --steps = its max_train_steps 100000.)
    python dpok.py --scorer reward-model --scorer-path runs/reward_model-<time>/final  # our learned reward instead
    python dpok.py --toy                                           # the offline toy world on a CPU, about a minute
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Literal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import scipy.stats
import torch
import torch.distributed as tdist
import torch.nn.functional as F
import tyro
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from common import chain, kernels, runtime
from common.data import load_prompts
from common.runtime import reference_unet, require
from common.scorers import load_scorer


@dataclasses.dataclass
class Args:
    # ---- model, prompts, reward
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """base model: hub id or local StableDiffusionPipeline folder (its scheduler config gives ᾱ and the timesteps)"""
    prompts: str = "partiprompts"
    """training prompts: a text file (one per line), .json list, parquet, HPSv2 folder, 'partiprompts' or 'pickapic'"""
    prompt: str | None = None
    """train on this one prompt instead (DPOK's single-prompt runs, e.g. "A green colored rabbit.")"""
    scorer: Literal["imagereward", "reward-model", "hps", "pickscore", "aesthetic", "clip", "toy"] = "imagereward"
    """r(x0, z) from common/scorers.py: 'imagereward' is DPOK's (official --reward_flag 0, the default); 'reward-model'
    the CLIP-embedding MLP that reward_model.py trains (DPOK's --reward_flag 1)"""
    scorer_path: str | None = None
    """the reward's weights: reward_model.py's output folder ('reward-model') or the head file ('aesthetic'), both
    required; ImageReward.pt or its folder ('imagereward'), HPS_v2.1_compressed.pt or its folder ('hps'), a copy of
    the model ('clip', 'pickscore'): None downloads the hub default"""
    clip_path: str | None = None
    """the reward's processor or backbone (None: the scorer's default, e.g. CLIP ViT-L/14); for 'imagereward' BLIP's
    BERT tokenizer (default bert-base-uncased)"""
    # ---- the method
    reward_coef: float = 10.0
    """α, weight of the reward term (official README single-prompt run: 10; argparse default 100; multi-prompt 1000)"""
    reward_scale: Literal["base", "none"] = "base"
    """'base': r / s, s the std of the base model's rewards on the fixed-seed validation set (measured once, at the
    start), so that α weighs a reward of unit spread against β·KL in any reward's units (DPOK's α, β were tuned on
    ImageReward, whose score is standardised by its authors); 'none': r in the scorer's own units, as DPOK's code
    (our departure: the default must also serve a learned reward, whose scores have no fixed unit)"""
    kl_coef: float = 0.01
    """β, weight of the KL term (official: 0.01 single prompt, 0.1 multi-prompt); 0 drops the reference pass (DDPO)"""
    kl: Literal["eps-mse", "gaussian"] = "eps-mse"
    """KL form: 'eps-mse' mean (ε̂_θ - ε̂_pre)², the official code's; 'gaussian' mean (μ_θ - μ_pre)² / (2σ_t²), exact"""
    clip: Literal["clamp", "ppo"] = "clamp"
    """'clamp': -A·clamp(ρ, 1±ε) (DPOK's code); 'ppo': max(-A·ρ, -A·clip(ρ, 1±ε)) (DDPO)"""
    clip_range: float = 1e-4
    """ε of the ratio clip (DPOK's --ratio_clip and DDPO's clip_range are both 1e-4)"""
    advantage: Literal["value", "raw", "per-prompt"] = "value"
    """A: 'value' r - V(x_t, z, t) (DPOK's --v_flag 1); 'raw' r; 'per-prompt' (r - mean_z) / std_z of recent r (DDPO)"""
    stat_buffer: int = 16
    """per-prompt: rewards remembered per prompt (ddpo-pytorch's per_prompt_stat_tracking.buffer_size)"""
    stat_min_count: int = 16
    """per-prompt: below this many rewards for a prompt, the whole batch's mean and std are used (ddpo-pytorch: 16)"""
    # ---- sampling (the policy's trajectories)
    rollout_steps: int = 50
    """T, DDIM steps per trajectory (official: 50)"""
    guidance_scale: float = 7.5
    """w, classifier-free guidance scale in sampling and in the policy's log-probability (official: 7.5)"""
    eta: float = 1.0
    """η of DDIM; must be > 0 so every transition is a Gaussian with a density (official: 1.0)"""
    sample_batch: int = 10
    """prompts sampled per iteration per GPU, one image each (official g_batch_size: 10 single prompt, 6 multi)"""
    resolution: int | None = None
    """image side in pixels (None: the UNet's sample size × the VAE's factor, 512 for SD1.5, the official size); the
    value net's input grows with its square"""
    # ---- policy and value updates
    buffer_size: int = 1000
    """replay buffer per GPU, in transitions; the oldest are dropped first (official: 1000)"""
    policy_steps: int = 5
    """optimizer steps on the policy per iteration (official p_step: 5)"""
    policy_batch: int = 4
    """transitions per micro-batch per GPU (official p_batch_size: 4 single prompt, 2 multi)"""
    grad_accum: int = 12
    """micro-batches per optimizer step; transitions per step = policy-batch x grad-accum x GPUs (official: 12)"""
    learning_rate: float = 1e-5
    """policy learning rate, AdamW (0.9, 0.999), no weight decay, constant (official: 1e-5)"""
    max_grad_norm: float = 0.1
    """gradient-norm clip of the policy (official clip_norm: 0.1)"""
    lora_rank: int = 4
    """LoRA rank on the attention projections (official: 4); 0 fine-tunes the whole UNet against a frozen copy"""
    value_steps: int = 5
    """value net: optimizer steps per iteration (official v_step: 5, which its code accumulates into a single step)"""
    value_batch: int = 256
    """value net: transitions per micro-batch per GPU (official v_batch_size: 256)"""
    value_learning_rate: float = 1e-4
    """value net learning rate, AdamW (official v_lr: 1e-4)"""
    steps: int = 10000
    """policy optimizer steps (official max_train_steps: 10000); --policy-steps of them per sample-then-update
    iteration, so 2000 iterations"""
    # ---- engineering
    seed: int = 0
    """seeds everything; rank r uses seed + r"""
    output_dir: str | None = None
    """run folder (default runs/dpok-<time>): args.json, metrics.jsonl, tb/, checkpoints/, samples/, final/,
    eval.json"""
    resume: bool = False
    """continue the run in --output-dir exactly (weights, optimizers, replay buffer, RNG streams)"""
    overwrite: bool = False
    """start afresh in a non-empty --output-dir, deleting the previous run's outputs (refused without this flag)"""
    checkpoint_every: int = 500
    """policy steps between checkpoints, a multiple of --policy-steps (official save_interval: 100 iterations)"""
    sample_every: int = 500
    """policy steps between fixed-seed validation grids and rewards/eval_mean, a multiple of --policy-steps"""
    num_validation_prompts: int = 8
    """validation images: the first prompts of --validation-prompts (cycled), image k drawn from its own generator
    seeded k"""
    validation_prompts: str | None = None
    """prompt set of the fixed-seed validation images and eval.json (common.data.load_prompts; None: --prompts)"""
    sample_steps: int = 50
    """DDIM steps (η = 0, evaluate.py's sampler) of the final base-vs-trained comparison in eval.json; the grids and
    rewards/eval_mean during training use the policy's own sampler (--rollout-steps, --eta)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """autocast dtype over fp32 master weights (official: fp16); CPUs take 'no' or 'bf16'"""
    gradient_checkpointing: bool = False
    """recompute UNet activations in the backward pass: less memory, more time (official: on)"""
    compile: bool = False
    """torch.compile the loss, log-probability and KL kernels (common/kernels.py); eager is the reference"""
    toy: bool = False
    """run on the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""


def toy_defaults(prompts_given: bool = False) -> Args:
    """--toy: the toy world and CPU-sized settings (about a minute on 2 CPU cores; three with --prompts).

    DPOK's single-prompt setting, on the prompt the toy model gets wrong most often (at 5 DDIM steps it paints most
    "red circles" green: reward 0.06). Each iteration samples 48 images and trains on exactly those transitions
    (buffer = one iteration) in two policy steps of 120: the second finds ρ past 1 ± 1e-4 wherever the first moved
    it, and the clamp silences those (charts/clip_frac ≈ 0.5), as in DPOK's code. A full fine-tune at lr 1e-4: LoRA
    on this 1M-parameter UNet gains less in 12 iterations (rank 8 at lr 2e-3: reward 0.06 -> 0.14, against 0.24).

    `prompts_given` (--prompts, e.g. the study's 12 training prompts) trains on those, in many small steps with
    DDPO's per-prompt advantages: 48 iterations of one policy step (120 of the iteration's 240 transitions, every one
    inside the clamp) at lr 5e-5, A = r standardised by the last 16 rewards of its prompt. Across prompts the signal
    per image is weaker than on the single prompt: 12 iterations of two steps at lr 1e-4 moved the held-out reward on
    one seed of three, and on a learned reward the value net's baseline left it flat where per-prompt statistics
    raised it on every seed we ran (docs/dpok.md, "On a learned reward").
    """
    from common.toy import toy_world

    world = toy_world()
    args = Args(toy=True, model=str(world.pipeline), prompts=str(world.prompts),
                prompt=None if prompts_given else "a red circle on a white background", scorer="toy",
                mixed_precision="no", rollout_steps=5, guidance_scale=5.0, sample_batch=48, buffer_size=240,
                policy_steps=2, policy_batch=60, grad_accum=2, learning_rate=1e-4, max_grad_norm=1.0, lora_rank=0,
                value_steps=20, value_batch=64, value_learning_rate=1e-3, steps=24, checkpoint_every=12,
                sample_every=12, num_validation_prompts=48, sample_steps=20)
    if prompts_given:
        args = dataclasses.replace(args, policy_steps=1, learning_rate=5e-5, steps=48, advantage="per-prompt",
                                   checkpoint_every=24, sample_every=24)
    return args


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--toy" in argv:
        return tyro.cli(Args, args=argv, default=toy_defaults(any(a.startswith("--prompts") for a in argv)))
    return tyro.cli(Args, args=argv)


# ------------------------------------------------------------------------------------------------ the method


def dpok_loss(log_prob, old_log_prob, adv, kl, reward_coef: float, kl_coef: float,
              clip: Literal["clamp", "ppo"], clip_range: float):
    """DPOK's per-transition loss (clip='clamp'), or DDPO's PPO objective (clip='ppo'), plus β·KL.

        ρ     = exp(log p_θ - log p_old)                                             (B,)
        clamp: L = α · mean[-A · clamp(ρ, 1-ε, 1+ε)] + β · mean[KL]    zero gradient once ρ leaves 1 ± ε
        ppo:   L = α · mean[max(-A · ρ, -A · clip(ρ, 1-ε, 1+ε))] + β · mean[KL]   gradient -A·∇ρ unless the clip
                                                                                   is the pessimistic side
    log_prob, old_log_prob, adv, kl: (B,). Returns (loss, policy_loss, clip_frac, approx_kl), where
    approx_kl = mean[(ρ - 1) - log ρ] (http://joschu.net/blog/kl-approx.html, as CleanRL logs it).
    """
    log_ratio = log_prob - old_log_prob  # (B,)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    if clip == "clamp":  # train_online_pg.py: ratio = torch.clamp(ratio, 1 - ratio_clip, 1 + ratio_clip)
        policy = -adv * clipped
    else:  # ddpo-pytorch scripts/train.py: torch.maximum(unclipped_loss, clipped_loss)
        policy = torch.maximum(-adv * ratio, -adv * clipped)
    policy_loss = reward_coef * policy.mean()
    loss = policy_loss + kl_coef * kl.mean()
    clip_frac = ((ratio - 1).abs() > clip_range).float().mean()
    approx_kl = ((ratio - 1) - log_ratio).mean()
    return loss, policy_loss, clip_frac, approx_kl


class ValueNet(torch.nn.Module):
    """V(x_t, z, t) ≈ E[r | x_t, z], the official ValueMulti (dpok/reward_model.py): the flat latent concatenated
    with the prompt's pooled text embedding, three 256-wide ReLU layers each scaled by a learned vector per step."""

    def __init__(self, in_dim: int, num_steps: int, width: int = 256):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(d, width) for d in (in_dim, width, width)])
        self.gammas = torch.nn.ModuleList([torch.nn.Embedding(num_steps, width) for _ in range(3)])
        self.out = torch.nn.Linear(width, 1)
        for layer, gamma in zip(self.layers, self.gammas):
            torch.nn.init.xavier_normal_(layer.weight)
            torch.nn.init.uniform_(gamma.weight)  # as the official ConditionalLinear

    def forward(self, x_t, text, step):  # (N, C, H, W), (N, D), (N,) step index -> (N,)
        h = torch.cat([x_t.flatten(1).float(), text.float()], dim=1)
        for layer, gamma in zip(self.layers, self.gammas):
            h = F.relu(layer(h) * gamma(step))
        return self.out(h).squeeze(1)


def per_prompt_advantages(rewards, prompts: list[str], history: dict[str, list[float]], size: int, min_count: int):
    """DDPO's PerPromptStatTracker: A = (r - mean) / (std + 1e-6) over each prompt's last `size` rewards (this batch
    included), or over the whole batch while a prompt has fewer than `min_count`; clipped to ±5 (adv_clip_max).
    `history` is updated in place. rewards (N,) -> (N,)."""
    adv = torch.empty_like(rewards)
    for prompt in dict.fromkeys(prompts):
        mask = torch.tensor([p == prompt for p in prompts], device=rewards.device)
        history[prompt] = (history.get(prompt, []) + rewards[mask].tolist())[-size:]
        ref = torch.tensor(history[prompt]) if len(history[prompt]) >= min_count else rewards.cpu()
        adv[mask] = (rewards[mask] - ref.mean().item()) / (ref.std(unbiased=False).item() + 1e-6)
    return adv.clamp(-5, 5)


def explained_variance(r, v):
    """1 - Var(r - V) / Var(r), as CleanRL logs it for PPO's value net (NaN when Var(r) = 0). Near 1, subtracting V
    removes most of the advantages' noise; <= 0, it adds noise. r, v (N,) -> scalar."""
    return 1 - (r - v).var() / r.var() if r.var() > 0 else torch.tensor(float("nan"))


# ------------------------------------------------------------------------------------------------ helpers


@torch.no_grad()
def encode(prompts: list[str], tokenizer, text_encoder, device):
    """Token embeddings (N, 77, D) for the UNet and the pooled embedding (N, D) for the value net."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    out = text_encoder(ids)
    return out.last_hidden_state, out.pooler_output


def latent_shape(unet, vae, resolution: int, n: int) -> tuple[int, int, int, int]:
    """x_T's shape for n images of `resolution` px: (n, 4, 64, 64) at SD1.5's 512."""
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    return n, unet.config.in_channels, side, side


@torch.no_grad()
def validate(unet, ref_unet, vae, scorer, val_prompts, val_emb, sched, args, autocast, device, with_kl=False):
    """The fixed-seed validation set: image k from its own CPU generator seeded k, so grids and rewards compare across
    runs and methods. Returns (images, rewards (K,), KL to p_pre (K,))."""
    gens = [torch.Generator().manual_seed(k) for k in range(len(val_prompts))]
    noise = lambda shape: torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)  # noqa: E731
    x_T = noise(latent_shape(unet, vae, args.resolution, len(val_prompts)))  # (K, 4, h, w)
    latents, _, kl = chain.sample_trajectories(unet, {"encoder_hidden_states": val_emb}, sched, x_T, args.eta,
                                               args.guidance_scale, noise, autocast, ref_unet, with_kl)
    images = chain.decode(vae, latents[-1])
    return images, scorer(images, val_prompts).float(), kl


# ------------------------------------------------------------------------------------------------ main


def main(args: Args) -> Path:
    dist = runtime.setup_distributed()
    device = dist.device
    # ---- guard rails: reject what cannot work before loading anything
    runtime.check_model_path(args.model, "--model")
    T = args.rollout_steps
    require(args.reward_coef > 0, f"--reward-coef must be > 0, got {args.reward_coef}")
    require(args.kl_coef >= 0, f"--kl-coef must be >= 0, got {args.kl_coef}")
    require(args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}")
    require(args.value_learning_rate > 0, f"--value-learning-rate must be > 0, got {args.value_learning_rate}")
    require(args.clip_range > 0, f"--clip-range must be > 0, got {args.clip_range}")
    require(0 < args.eta <= 1, f"--eta must be in (0, 1] so each transition has a density, got {args.eta}")
    require(T >= 1, f"--rollout-steps must be >= 1, got {T}")
    require(args.guidance_scale >= 1, f"--guidance-scale must be >= 1, got {args.guidance_scale}")
    require(min(args.sample_batch, args.policy_batch, args.grad_accum, args.policy_steps, args.value_steps,
                args.value_batch, args.steps, args.checkpoint_every, args.sample_every, args.num_validation_prompts) >= 1,
            "--sample-batch, --policy-batch, --grad-accum, --policy-steps, --value-steps, --value-batch, --steps, "
            "--checkpoint-every, --sample-every and --num-validation-prompts must be >= 1")
    for flag, value in (("--steps", args.steps), ("--checkpoint-every", args.checkpoint_every),
                        ("--sample-every", args.sample_every)):
        require(value % args.policy_steps == 0, f"{flag} {value} must be a multiple of --policy-steps "
                f"{args.policy_steps}: the policy takes that many steps per sample-then-update iteration")
    iterations = args.steps // args.policy_steps
    require(args.buffer_size >= args.sample_batch * T,
            f"--buffer-size {args.buffer_size} must hold one iteration's {args.sample_batch} x {T} transitions")
    require(args.stat_min_count <= args.stat_buffer, "--stat-min-count must be <= --stat-buffer")
    require(args.scorer not in ("reward-model", "aesthetic") or (args.scorer_path and Path(args.scorer_path).exists()),
            f"--scorer-path {args.scorer_path!r} does not exist: --scorer {args.scorer} needs "
            + ("the folder reward_model.py wrote (e.g. runs/reward_model-<time>/final)" if args.scorer == "reward-model"
               else "the LAION aesthetic head's weights (sac+logos+ava1-l14-linearMSE.pth)"))
    require(args.scorer_path is None or Path(args.scorer_path).exists(),
            f"--scorer-path {args.scorer_path!r} does not exist (--scorer {args.scorer})")
    require(device.type == "cuda" or args.mixed_precision != "fp16", "--mixed-precision fp16 needs a GPU; use bf16, no")
    require(not args.resume or args.output_dir is not None, "--resume needs the --output-dir of the run to continue")
    if args.resolution is None:  # the UNet's own size: its sample_size latents x the VAE's downsampling factor
        vae_factor = 2 ** (len(AutoencoderKL.load_config(args.model, subfolder="vae")["block_out_channels"]) - 1)
        side = UNet2DConditionModel.load_config(args.model, subfolder="unet")["sample_size"]
        args = dataclasses.replace(args, resolution=side * vae_factor)
    runtime.check_resolution(args.model, args.resolution)
    runtime.seed_everything(args.seed, dist.rank)
    if args.output_dir is None:  # rank 0's clock, so every rank writes to the same folder
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if tdist.is_initialized():
            tdist.broadcast_object_list(stamp, src=0)
        args = dataclasses.replace(args, output_dir=f"runs/dpok-{stamp[0]}")
    out = runtime.prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                                     is_main=dist.is_main)

    # ---- models: frozen VAE and text encoder; the UNet with LoRA (or full, against a frozen copy)
    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").requires_grad_(False)
    text_encoder, vae = text_encoder.to(device), vae.to(device)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device)
    scheduler = DDIMScheduler.from_pretrained(args.model, subfolder="scheduler")
    require(scheduler.config.prediction_type == "epsilon",
            f"{args.model}: prediction_type {scheduler.config.prediction_type!r}; DPOK's step needs 'epsilon'")
    ref_unet = None
    if args.lora_rank > 0:
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    else:  # a full fine-tune keeps a frozen copy as p_pre: the KL term and the final comparison both need it
        ref_unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").requires_grad_(False)
        ref_unet = ref_unet.to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    text_dim = text_encoder.config.hidden_size
    latent_dim = math.prod(latent_shape(unet, vae, args.resolution, 1))
    value_net = ValueNet(latent_dim + text_dim, T).to(device)
    # The official code passes adam_weight_decay=0 to the policy's AdamW and torch's default (0.01) to the value's.
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    value_optimizer = torch.optim.AdamW(value_net.parameters(), lr=args.value_learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16,
                              enabled=args.mixed_precision != "no")
    ddp = dict(device_ids=[dist.local_rank]) if device.type == "cuda" else {}
    policy = torch.nn.parallel.DistributedDataParallel(unet, **ddp) if dist.world_size > 1 else unet
    value = torch.nn.parallel.DistributedDataParallel(value_net, **ddp) if dist.world_size > 1 else value_net
    log_prob_fn = kernels.compiled(kernels.gaussian_log_prob, args.compile)
    kl_fn = kernels.compiled(kernels.eps_mse_kl if args.kl == "eps-mse" else kernels.gaussian_kl, args.compile)
    loss_fn = kernels.compiled(dpok_loss, args.compile)

    sched = chain.ddim_schedule(scheduler, T, device)  # (timesteps, ᾱ_t, ᾱ_{t-1}), each (T,): 981, 961, .., 1

    prompts = [args.prompt] if args.prompt else load_prompts(args.prompts)
    require(len(prompts) > 0 and all(prompts), f"--prompts {args.prompts} / --prompt {args.prompt!r}: no prompts")
    clip_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    scorer = load_scorer(args.scorer, args.scorer_path, clip_path=args.clip_path, device=device, dtype=clip_dtype,
                         flags=("--scorer-path", "--clip-path"))
    uncond = encode([""], tokenizer, text_encoder, device)[0]  # (1, 77, D)

    def embed(ids: torch.Tensor):
        """prompt indices (N,) -> [uncond; cond] token embeddings (2N, 77, D) and pooled embeddings (N, D)."""
        hidden, pooled = encode([prompts[i] for i in ids.tolist()], tokenizer, text_encoder, device)
        return torch.cat([uncond.expand(len(ids), -1, -1), hidden]), pooled

    val_prompts = load_prompts(args.validation_prompts) if args.validation_prompts else prompts
    require(len(val_prompts) > 0, f"--validation-prompts {args.validation_prompts}: no prompts")
    val_prompts = [val_prompts[i % len(val_prompts)] for i in range(args.num_validation_prompts)]  # the first, cycled
    val_emb = torch.cat([uncond.expand(len(val_prompts), -1, -1), encode(val_prompts, tokenizer, text_encoder, device)[0]])
    evaluation = (vae, scorer, val_prompts, val_emb, sched, args, autocast, device)  # validate()'s fixed arguments

    # ---- state that a checkpoint carries: weights, optimizers, replay buffer, per-prompt statistics, RNG streams
    gen = torch.Generator().manual_seed(args.seed + dist.rank)  # prompt choice and minibatch order
    noise_gen = torch.Generator(device).manual_seed(args.seed + dist.rank)  # sampling noise
    buffer: dict[str, torch.Tensor] = {}
    history: dict[str, list[float]] = {}
    start = 0
    if args.resume:
        start, weights, extra = runtime.load_checkpoint(out, script="dpok.py")
        start //= args.policy_steps  # checkpoints count policy steps; the loop counts iterations
        runtime.check_resume_args(extra["args"], args)
        missing = {n for n, p in unet.named_parameters() if p.requires_grad} - set(weights["policy"])
        require(not missing, f"--resume {out}: the checkpoint lacks {len(missing)} trainable tensors "
                f"(e.g. {next(iter(missing), '')}); was it saved with another --lora-rank?")
        unet.load_state_dict(weights["policy"], strict=False)
        value_net.load_state_dict(weights["value"])
        mine = f".rank{dist.rank}"  # this rank's replay buffer
        buffer = {k.removesuffix(mine): v.to(device) for k, v in weights["buffer"].items() if k.endswith(mine)}
        optimizer.load_state_dict(extra["optimizer"])
        value_optimizer.load_state_dict(extra["value_optimizer"])
        scaler.load_state_dict(extra["scaler"])
        history = extra["history"]
        runtime.set_rng_state(extra["rng"][dist.rank], generators=[gen, noise_gen])
    if dist.is_main:
        runtime.write_args(out, args)
    logger = runtime.MetricsLogger(out, enabled=dist.is_main, resume_step=start * args.policy_steps if args.resume else None)

    per_iter = args.sample_batch * T
    per_step = args.policy_batch * args.grad_accum * dist.world_size
    if dist.is_main:
        print(f"DPOK ({args.resolution} px): {dist.world_size} GPU(s) x {args.sample_batch} prompts x {T} steps = "
              f"{per_iter * dist.world_size} transitions sampled per iteration; buffer {args.buffer_size} per GPU "
              f"({args.buffer_size / per_iter:.1f} iterations)\n"
              f"policy: {args.policy_steps} steps/iteration x ({args.policy_batch} transitions x {args.grad_accum} "
              f"accumulation x {dist.world_size} GPUs = {per_step}) = {args.policy_steps * per_step} transitions "
              f"trained per iteration (replay ratio {args.policy_steps * per_step / per_iter / dist.world_size:.2f}); "
              f"lr {args.learning_rate:g}, {sum(p.numel() for p in params):,} trainable parameters "
              f"({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full UNet'})\n"
              f"value net ({'on' if args.advantage == 'value' else 'off'}): {args.value_steps} steps/iteration x "
              f"{args.value_batch} transitions x {dist.world_size} GPUs, lr {args.value_learning_rate:g}\n"
              f"{iterations} iterations: {iterations * args.sample_batch * dist.world_size:,} images, "
              f"{args.steps:,} policy steps (--steps); α={args.reward_coef:g} β={args.kl_coef:g} "
              f"KL={args.kl} clip={args.clip}(ε={args.clip_range:g}) advantage={args.advantage}")

    def save_samples(it: int) -> None:
        images, rewards, _ = validate(unet, ref_unet, *evaluation)
        captions = [f"{p[:40]} {r:.2f}" for p, r in zip(val_prompts, rewards.tolist())]
        grid = runtime.save_image_grid(images, out / "samples" / f"step_{it:07d}.png", nrow=8, captions=captions,
                                       upscale=max(1, 128 // images.shape[-1]))
        logger.log_images("samples", grid, it)
        logger.log({"rewards/eval_mean": rewards.mean()}, it)

    # The reward's unit: s = std of the base model's validation rewards; deterministic (fixed seeds), so a resumed run
    # measures the same s. A learned reward's scores have no fixed scale (ours spread by ~20, the toy reward by ~0.1):
    # without this, α/β means a KL weight 200x weaker on one than on the other, and the policy drifts off.
    reward_unit = 1.0
    if args.reward_scale == "base":
        with reference_unet(unet, ref_unet) as ref:
            base_rewards = validate(ref, None, *evaluation)[1]
        bad = int((~torch.isfinite(base_rewards)).sum())  # NaN weights give NaN rewards, whose std is no "0"
        require(bad == 0, f"--scorer {args.scorer}: {bad} of the base model's {len(base_rewards)} validation rewards "
                f"are NaN or inf; the scorer's weights (--scorer-path {args.scorer_path}) are probably broken")
        reward_unit = base_rewards.std().item()
        require(reward_unit > 0, "--reward-scale base: the base model's validation rewards are all equal; use none")
        if dist.is_main:
            print(f"reward unit: r / {reward_unit:.4g} (the std of the base model's {args.num_validation_prompts} validation rewards)")
    if start == 0 and dist.is_main:
        save_samples(0)  # the base model's grid
    for it in tqdm(range(start, iterations), initial=start, total=iterations, disable=not dist.is_main):
        done = (it + 1) * args.policy_steps  # policy optimizer steps after this iteration: every metric's x axis
        t0 = time.time()
        # ---------------- 1. sample trajectories with the current policy, recording log p as they are drawn
        idx = torch.randint(len(prompts), (args.sample_batch,), generator=gen)  # (N,)
        batch_prompts = [prompts[i] for i in idx.tolist()]
        noise = lambda shape: torch.randn(shape, generator=noise_gen, device=device)  # noqa: E731
        emb, pooled = embed(idx)
        x_T = noise(latent_shape(unet, vae, args.resolution, args.sample_batch))  # (N, 4, h, w)
        latents, log_probs, _ = chain.sample_trajectories(unet, {"encoder_hidden_states": emb}, sched, x_T, args.eta,
                                                          args.guidance_scale, noise, autocast)
        with torch.no_grad():
            rewards = scorer(chain.decode(vae, latents[-1]), batch_prompts).float().to(device) / reward_unit  # (N,)
        all_rewards = runtime.gather(rewards, dist)
        if it == 0 and args.advantage == "value":  # V starts at the mean reward, not 0: the first steps get centred
            with torch.no_grad():                   # advantages instead of A = r (a reward model's r may be ~30)
                value_net.out.bias.fill_(all_rewards.mean().item())
        if args.advantage == "per-prompt":  # statistics over every rank's samples, so all ranks agree
            all_prompts = [prompts[i] for i in runtime.gather(idx.to(device), dist).tolist()]
            adv = per_prompt_advantages(all_rewards, all_prompts, history, args.stat_buffer, args.stat_min_count)
            adv = adv.reshape(dist.world_size, -1)[dist.rank]
        else:
            adv = rewards  # 'value' subtracts V(x_t, z, t) at update time, with the value net of that moment
        if args.advantage == "value":  # how much of r the baseline explains on transitions it has not been fitted to
            with torch.no_grad():
                pred = value_net(latents[:-1].flatten(0, 1), pooled.repeat(T, 1),
                                 torch.arange(T, device=device).repeat_interleave(args.sample_batch))
            explained = explained_variance(rewards.repeat(T), pred)
        new = dict(x_t=latents[:-1].flatten(0, 1), x_prev=latents[1:].flatten(0, 1),  # (T·N, C, H, W), step-major
                   step=torch.arange(T, device=device).repeat_interleave(args.sample_batch),
                   prompt=idx.to(device).repeat(T), log_prob=log_probs.flatten(), reward=rewards.repeat(T),
                   adv=adv.repeat(T))
        buffer = {k: torch.cat([buffer[k], v])[-args.buffer_size:] if k in buffer else v for k, v in new.items()}
        size = len(buffer["step"])

        def minibatches(count: int, batch: int):  # walk random permutations of the buffer (DDPO's inner epoch)
            order = torch.cat([torch.randperm(size, generator=gen) for _ in range(math.ceil(count * batch / size))])
            return order[: count * batch].to(device).view(count, batch)

        # ---------------- 2. the policy: DPOK's loss on replayed transitions
        sums = dict.fromkeys(["loss", "policy_loss", "kl", "clip_frac", "approx_kl", "ratio", "grad_norm"], 0.0)
        for steps in minibatches(args.policy_steps * args.grad_accum, args.policy_batch).split(args.grad_accum):
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for k, b in enumerate(steps):
                x_t, x_prev, step = buffer["x_t"][b], buffer["x_prev"][b], buffer["step"][b]
                emb, pooled = embed(buffer["prompt"][b])
                t, ab_t, ab_prev = (x[step] for x in sched)
                ab_t, ab_prev = ab_t.view(-1, 1, 1, 1), ab_prev.view(-1, 1, 1, 1)
                sync = k == args.grad_accum - 1 or dist.world_size == 1
                with contextlib.nullcontext() if sync else policy.no_sync():
                    with autocast:
                        eps = chain.guided_eps(policy, x_t, t, {"encoder_hidden_states": emb}, args.guidance_scale)
                    mean, std = chain.ddim_transition(eps, x_t, ab_t, ab_prev, args.eta)
                    log_prob = log_prob_fn(x_prev, mean, std)  # (B,)
                    kl = torch.zeros_like(log_prob)
                    if args.kl_coef > 0:
                        with torch.no_grad(), autocast, reference_unet(unet, ref_unet) as ref:
                            eps_ref = chain.guided_eps(ref, x_t, t, {"encoder_hidden_states": emb}, args.guidance_scale)
                        kl = kl_fn(eps, eps_ref) if args.kl == "eps-mse" else \
                            kl_fn(mean, chain.ddim_transition(eps_ref, x_t, ab_t, ab_prev, args.eta)[0], std)
                    adv = buffer["adv"][b]
                    if args.advantage == "value":
                        with torch.no_grad():
                            adv = adv - value_net(x_t, pooled, step)
                    loss, policy_loss, clip_frac, approx_kl = loss_fn(
                        log_prob, buffer["log_prob"][b], adv, kl, args.reward_coef, args.kl_coef, args.clip,
                        args.clip_range)
                    scaler.scale(loss / args.grad_accum).backward()
                step_loss += loss.detach() / args.grad_accum
                ratio = (log_prob - buffer["log_prob"][b]).exp().mean()
                for name, v in zip(sums, (loss, policy_loss, kl.mean(), clip_frac, approx_kl, ratio)):
                    sums[name] += v.detach() / (args.grad_accum * args.policy_steps)
            runtime.check_finite(runtime.all_reduce_mean(step_loss, dist), done, out)  # all ranks stop together
            scaler.unscale_(optimizer)
            sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) / args.policy_steps
            scaler.step(optimizer)
            scaler.update()

        # ---------------- 3. the value net: MSE to the final reward. Fitted after the policy step (the official code
        # fits it before): a baseline fitted to these very rewards would shrink their advantages toward 0 (biased).
        metrics = {}
        if args.advantage == "value":
            value_loss = torch.zeros((), device=device)
            for b in minibatches(args.value_steps, args.value_batch):
                pooled = embed(buffer["prompt"][b])[1]
                loss = F.mse_loss(value(buffer["x_t"][b], pooled, buffer["step"][b]), buffer["reward"][b])
                value_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value_optimizer.step()
                value_loss += loss.detach() / args.value_steps
            metrics["losses/value_loss"] = value_loss
            metrics["charts/value_explained_variance"] = runtime.all_reduce_mean(explained, dist)

        # ---------------- logging, samples, checkpoints
        names = {"loss": "losses/loss", "policy_loss": "losses/policy_loss", "kl": "losses/kl"}
        metrics |= {names.get(k, f"charts/{k}"): runtime.all_reduce_mean(v, dist) for k, v in sums.items()}
        if "losses/value_loss" in metrics:
            metrics["losses/value_loss"] = runtime.all_reduce_mean(metrics["losses/value_loss"], dist)
        metrics |= {"rewards/mean": all_rewards.mean() * reward_unit,  # in the scorer's units
                    "rewards/std": all_rewards.std(unbiased=False) * reward_unit,
                    "charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/buffer_size": size,
                    "charts/images": (it + 1) * args.sample_batch * dist.world_size,
                    "charts/seconds_per_iteration": time.time() - t0}
        logger.log(metrics, done)
        if dist.is_main and (done % args.sample_every == 0 or done == args.steps):
            save_samples(done)
        if done % args.checkpoint_every == 0 or done == args.steps:
            trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
            shards = {f"{k}.rank{r}": v for k, v in buffer.items() for r, v in
                      enumerate(runtime.gather(v, dist).chunk(dist.world_size))}
            weights = {"policy": trainable, "value": value_net.state_dict(), "buffer": shards}
            extra = {"optimizer": optimizer.state_dict(), "value_optimizer": value_optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "history": history, "args": args, "base_model": args.model}
            runtime.save_checkpoint(out, done, weights, extra, generators=[gen, noise_gen], script="dpok.py")

    # ---- final weights in diffusers format, and the fixed-seed comparison with the base model
    if dist.is_main:
        final_dir = out / "final" / ("lora" if args.lora_rank > 0 else "unet")
        if args.lora_rank > 0:
            StableDiffusionPipeline.save_lora_weights(
                final_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
            load = f'pipe.load_lora_weights("{runtime.absolute(final_dir)}", ' \
                   f'weight_name="pytorch_lora_weights.safetensors")'
        else:
            unet.save_pretrained(final_dir)
            load = f'pipe.unet = UNet2DConditionModel.from_pretrained("{runtime.absolute(final_dir)}")'
        _, final_policy, kl = validate(unet, ref_unet, *evaluation, with_kl=True)
        # The comparison itself with evaluate.py's sampler (DDIM --sample-steps, η = 0, image k seeded k), so that
        # eval.json and evaluate.py agree on the same model.
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler.from_config(scheduler.config), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
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
                      num_validation_prompts=args.num_validation_prompts, validation_prompts=val_prompts, steps=args.steps,
                      sample_steps=args.sample_steps, eta=0.0)
        print(f"fixed-seed reward (DDIM {args.sample_steps} steps, η 0): base {result['reward_base']:.4f} -> final "
              f"{result['reward_final']:.4f} (paired t-test p = {p_value:.2g}); KL to the base {result['kl_final']:.4g}"
              f"\nload with:\n    from diffusers import StableDiffusionPipeline, UNet2DConditionModel; "
              f'pipe = StableDiffusionPipeline.from_pretrained("{runtime.absolute(args.model)}"); {load}')
        if warning := runtime.below_base_warning(result["reward_final"], result["reward_base"]):
            result["warning"] = warning
        (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.close()
    runtime.barrier()
    runtime.cleanup_distributed()
    return out


if __name__ == "__main__":
    main(parse_args())
