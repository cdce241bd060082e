"""Reward backpropagation through the sampling chain: DRaFT (-K, -LV), AlignProp and ReFL, SD1.5 and SDXL.

Docs (usage, logged metrics, implementation details with sources, toy results, tests): docs/draft.md

For a differentiable reward r(x₀, c), sample x_T .. x₀ with the model's own DDIM chain (common/chain.py) and ascend
the reward's gradient through the chain into the UNet's weights θ (a LoRA by default). The three methods differ in
which steps carry the gradient and in the loss on r:

    DRaFT     (Clark et al. 2023, https://arxiv.org/abs/2309.17400; no official code)
              L(θ) = -λ · E_c E_{x_T} [ r(sample_θ(x_T, c), c) ]
              DRaFT-K: the gradient flows only through the last K of the T steps (stop-gradient before them);
              K = T is full DRaFT, each step recomputed in the backward pass (torch.utils.checkpoint).
              DRaFT-LV: x₀ from the chain without gradient, then n times x_1^i = √ᾱ_1·x₀ + √(1-ᾱ_1)·ε_i and one step
              back with gradient; the loss averages -r over the n images (lower variance for K = 1).
    AlignProp (Prabhudesai et al. 2023, https://arxiv.org/abs/2310.03739; official mihirp1998/AlignProp)
              DRaFT-K with K drawn at random for every chain, K ~ U{K_min .. K_max} (randomised truncation)
    ReFL      (Xu et al. 2023, the ImageReward paper, https://arxiv.org/abs/2304.05977; official THUDM/ImageReward,
              ImageReward/ReFL.py): run the chain without gradient to a random late step s ~ U{⌊f_lo·T⌋ .. ⌈f_hi·T⌉-1},
              predict x̂₀ = (x_t - √(1-ᾱ_t)·ε̂_θ(x_t, t, c)) / √ᾱ_t in one step with gradient, and descend
              L(θ) = λ · E[ relu(m - r(x̂₀, c)) ] + λ_pre · E_{(x', c') ~ D_pre} ‖ε - ε_θ(x'_t, t, c')‖²

One named loss covers all three (`reward_backprop_loss`): L = λ·mean φ(r) + λ_pre·L_pre, φ(r) = -r ('neg': DRaFT,
AlignProp) or relu(m - r) ('relu': ReFL's official form). Each DDIM step is common/chain.py's: ε̂ = ε(x_t, ∅) +
w·(ε(x_t, c) - ε(x_t, ∅)), x_{t-1} = μ(ε̂, x_t) + σ_t·z (σ_t = 0 at η = 0, the default: a deterministic chain).

These methods reward-hack readily (the papers say so): the validation grids log what the reward does not see, the CLIP
score of the images against their prompts and the spread of one prompt's images across seeds (`seed_diversity`),
next to the reward, and eval.json compares all three with the base model.

Paper symbol -> flag / variable: K --backprop-steps (0 = T: full DRaFT), [K_min, K_max] --random-backprop
(AlignProp), n --lv-samples (DRaFT-LV), [f_lo, f_hi] --refl-stop-range, φ --reward-loss, m --reward-margin,
λ --reward-coef, λ_pre --pretrain-coef, D_pre --pretrain-data, T --rollout-steps, η --eta, w --guidance-scale,
r = the --scorer through common.scorers.differentiable_score; x̂₀ = `x0_hat`, ε̂ = `eps`.

Usage (--method picks the recipe; every flag it sets can be given as well):
    python draft.py --scorer aesthetic --scorer-path sac+logos+ava1-l14-linearMSE.pth   # DRaFT-1, aesthetic, LoRA
    python draft.py --backprop-steps 0                                 # full DRaFT (every step, checkpointed)
    python draft.py --lv-samples 2                                     # DRaFT-LV
    torchrun --nproc_per_node 4 draft.py --method alignprop --scorer hps --prompts hps_v2_all.txt   # AlignProp HPS
    torchrun --nproc_per_node 8 draft.py --method refl --scorer imagereward --prompts refl_prompts.txt  # ReFL
    python draft.py --model stabilityai/stable-diffusion-xl-base-1.0 --gradient-checkpointing   # SDXL
    python draft.py --toy                                              # the offline toy world, a few minutes on a CPU
"""

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
import torch.nn.functional as F
import tyro
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from common import chain, runtime
from common.data import decode_image, load_captioned_images, load_prompts, preprocess
from common.models import SDXL, ddim_sampler, load_text_encoders, load_vae, make_pipeline, model_family, save_final
from common.runtime import reference_unet, require
from common.scorers import differentiable_score, load_scorer


@dataclasses.dataclass
class Args:
    # ---- model, prompts, reward
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """base model: hub id or local SD1.5 or SDXL pipeline folder (DRaFT, ReFL: CompVis/stable-diffusion-v1-4, AlignProp:
    runwayml/stable-diffusion-v1-5; the same architecture)"""
    prompts: str = "partiprompts"
    """training prompts: a text file, .json list, parquet, HPSv2 folder, 'partiprompts' or 'pickapic' (AlignProp:
    assets/simple_animals.txt for aesthetic, hps_v2_all.txt for HPS; ReFL: the "text" fields of data/refl_data.json
    written one per line, since that file is a list of dicts, which --prompts does not read)"""
    scorer: Literal["hps", "imagereward", "pickscore", "aesthetic", "clip-raw", "reward-model", "toy"] = "aesthetic"
    """r(x0, c), differentiable, from common/scorers.py (DRaFT's and AlignProp's headline: the LAION aesthetic head,
    --scorer-path its weights; ReFL: 'imagereward'). 'clip-raw', not 'clip': the clamp of 'clip' has no gradient"""
    scorer_path: str | None = None
    """the reward's weights: the head file ('aesthetic', required), HPS_v2.1_compressed.pt or its folder ('hps'),
    ImageReward.pt or its folder, reward_model.py's output folder ('reward-model'); None downloads the hub default"""
    clip_path: str | None = None
    """the reward's processor or backbone (None: the scorer's default)"""
    clip_score_model: str | None = None
    """the CLIP of the reward-hacking check (CLIP score of the images vs their prompts, never trained on); None: the
    toy world's CLIP with --toy, else openai/clip-vit-large-patch14; 'none' skips the CLIP score"""
    # ---- the method
    method: Literal["draft", "alignprop", "refl"] = "draft"
    """which recipe: sets the gradient window, the loss and the flags left at None below (see `METHODS`)"""
    backprop_steps: int = 1
    """K of DRaFT-K: the gradient flows through the last K steps only; 0 = all T (full DRaFT) (DRaFT-1 is the paper's
    efficient default; full DRaFT its most memory-hungry)"""
    random_backprop: tuple[int, int] = (1, 50)
    """--method alignprop: K ~ U{K_min .. K_max} per chain, clipped to [1, T] (official aesthetic config:
    truncated_backprop_minmax (0, 50), K = T - start; K = 0 carries no gradient, so 1 here)"""
    lv_samples: int = 0
    """n of DRaFT-LV (--method draft): re-noise x0 n times to the last step and denoise with gradient; 0 = off
    (DRaFT-1 then); K is then irrelevant"""
    refl_stop_range: tuple[float, float] = (0.75, 1.0)
    """--method refl: the stop step s ~ U{⌊f_lo·T⌋ .. ⌈f_hi·T⌉ - 1} (official: randint(30, 39) of 40 steps)"""
    reward_loss: Literal["neg", "relu"] | None = None
    """φ(r): 'neg' = -r (DRaFT, AlignProp); 'relu' = relu(m - r) (ReFL's official loss); None: the method's"""
    reward_margin: float = 2.0
    """m of 'relu' (official ReFL: 2; ImageReward scores are standardised, so most images sit below it)"""
    reward_coef: float | None = None
    """λ, the loss scale (AlignProp: loss_coeff 0.01; ReFL: --grad_scale 1e-3; DRaFT: 1); None: the method's"""
    pretrain_coef: float = 0.0
    """λ_pre of ReFL's pre-training loss (the paper's Algorithm 1; the official ReFL.py has none: 0)"""
    pretrain_data: str | None = None
    """D_pre for --pretrain-coef > 0: captioned images (parquet file or folder, hub id; columns caption, image)"""
    # ---- sampling (the chain the gradient flows through)
    rollout_steps: int | None = None
    """T, DDIM steps of the chain (DRaFT, AlignProp: 50; ReFL: 40); None: the method's"""
    eta: float = 0.0
    """η of DDIM; 0 = deterministic (DRaFT, AlignProp's paper code: scheduler.step's default); > 0 reparameterises
    x_{t-1} = μ + σ_t·z, the gradient flowing through μ (AlignProp's TRL port: 1.0)"""
    guidance_scale: float | None = None
    """w, classifier-free guidance in the chain (DRaFT, AlignProp: 7.5; ReFL's training loop: none, 1.0)"""
    resolution: int | None = None
    """image side in pixels (None: the family's, 512 for SD1.5, 1024 for SDXL)"""
    # ---- the update
    per_device_batch: int = 4
    """chains per forward pass per GPU (AlignProp: 4 per GPU pass; ReFL: 2)"""
    grad_accum: int = 8
    """micro-batches per optimizer step (AlignProp: 8, so 4 x 8 x 4 GPUs = 128 chains per step; ReFL: 4 x 8 GPUs x 2)"""
    learning_rate: float | None = None
    """AdamW learning rate, constant (AlignProp: 1e-3 with LoRA; ReFL: 1e-5, full UNet); None: the method's"""
    weight_decay: float = 1e-4
    """AdamW weight decay (AlignProp TRL config: 1e-4; its paper code's aesthetic config: 0.1)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (AlignProp HPS and ReFL: 1.0; AlignProp aesthetic: 5.0)"""
    lora_rank: int | None = None
    """LoRA rank on the attention projections, 0 = the whole UNet (AlignProp: 4, diffusers' LoRAAttnProcessor default;
    ReFL: 0); None: the method's"""
    steps: int = 20
    """optimizer steps (AlignProp aesthetic: 7 epochs x 2 = 14, HPS: 25; ReFL: 100)"""
    # ---- engineering
    seed: int = 0
    """seeds everything; rank r uses seed + r"""
    output_dir: str | None = None
    """run folder (default runs/draft-<time>): args.json, metrics.jsonl, tb/, checkpoints/, samples/, final/,
    eval.json"""
    resume: bool = False
    """continue the run in --output-dir exactly (weights, optimizer, RNG streams)"""
    overwrite: bool = False
    """start afresh in a non-empty --output-dir, deleting the previous run's outputs (refused without this flag)"""
    checkpoint_every: int = 5
    """optimizer steps between checkpoints"""
    sample_every: int = 5
    """optimizer steps between fixed-seed validation grids: reward, CLIP score and seed diversity of the policy"""
    num_validation_prompts: int = 16
    """validation images: the first prompts of --validation-prompts, cycled (so a prompt recurs with other seeds),
    image k from its own generator seeded k"""
    validation_prompts: str | None = None
    """prompt set of the validation images and eval.json (common.data.load_prompts; None: --prompts)"""
    sample_steps: int = 50
    """DDIM steps (η = 0, evaluate.py's sampler) of the final base-vs-trained comparison in eval.json"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    """autocast dtype over fp32 trainable weights (AlignProp, ReFL: fp16); CPUs take 'no' or 'bf16'"""
    gradient_checkpointing: bool = False
    """recompute the UNet's blocks in the backward pass too (on top of the per-step checkpoints of the chain)"""
    checkpoint_chain: bool = True
    """recompute every step of the gradient window in the backward pass (torch.utils.checkpoint, DRaFT's and
    AlignProp's grad_checkpoint): memory of one UNet pass instead of K"""
    toy: bool = False
    """run on the offline toy world (common/toy.py) with CPU-sized defaults; flags given as well still win"""


# The recipes --method selects, for the flags left at None; from the papers and their official code (docs/draft.md).
METHODS = {
    "draft": dict(reward_loss="neg", reward_coef=1.0, rollout_steps=50, guidance_scale=7.5, learning_rate=1e-3,
                  lora_rank=4),
    "alignprop": dict(reward_loss="neg", reward_coef=0.01, rollout_steps=50, guidance_scale=7.5, learning_rate=1e-3,
                      lora_rank=4),
    "refl": dict(reward_loss="relu", reward_coef=1e-3, rollout_steps=40, guidance_scale=1.0, learning_rate=1e-5,
                 lora_rank=0),
}


def toy_defaults() -> Args:
    """--toy: the toy world, its 12 training prompts, CPU-sized settings (a few minutes on 2 CPU cores).

    5 DDIM steps (as grpo.py --toy), 8 chains per step, 30 steps, LoRA rank 4 (ReFL: the whole toy UNet); the
    validation images and eval.json use the toy VALIDATION prompts (6 prompts x 8 seeds), never trained on. λ = 1
    for every method on the toy (the papers' λ are tuned to their rewards' scales; Adam undoes a constant scale, the
    gradient clip does not).
    """
    from common.toy import PROMPT_FILES, toy_world

    world = toy_world()
    return Args(toy=True, model=str(world.pipeline), prompts=str(PROMPT_FILES["train"]), scorer="toy",
                validation_prompts=str(PROMPT_FILES["validation"]), resolution=world.resolution, mixed_precision="no",
                rollout_steps=5, guidance_scale=5.0, per_device_batch=8, grad_accum=1, steps=30, reward_coef=1.0,
                checkpoint_every=10, sample_every=10, num_validation_prompts=48, sample_steps=20,
                random_backprop=(1, 5), pretrain_data=str(world.pretrain), clip_score_model=str(world.clip))


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro over Args; with --toy the toy defaults replace Args' defaults, so flags given still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return tyro.cli(Args, args=argv, default=toy_defaults() if "--toy" in argv else None)


# --toy's learning rates, not tuned: AlignProp's LoRA rate for the LoRA recipes; for ReFL's whole UNet grpo.py --toy's
# full fine-tune rate (ReFL's 1e-5 is sized for SD1.4 and 100 steps of 64 images, not 30 steps of 8 on the toy)
TOY_LEARNING_RATE = {"draft": 1e-3, "alignprop": 1e-3, "refl": 3e-4}


def resolve(args: Args) -> Args:
    """The flags left at None take --method's values (METHODS; with --toy, TOY_LEARNING_RATE)."""
    recipe = METHODS[args.method] | ({"learning_rate": TOY_LEARNING_RATE[args.method]} if args.toy else {})
    return dataclasses.replace(args, **{k: v for k, v in recipe.items() if getattr(args, k) is None})


# ------------------------------------------------------------------------------------------------ the method


def reward_backprop_loss(rewards, kind: str, margin: float, reward_coef: float, pretrain_mse=None,
                         pretrain_coef: float = 0.0):
    """L = λ · mean_i φ(r_i) + λ_pre · L_pre,  φ(r) = -r ('neg': DRaFT, AlignProp) or relu(m - r) ('relu': ReFL).

    rewards (B,) with their graph back to θ; pretrain_mse: a scalar denoising loss ‖ε - ε_θ(x'_t, t, c')‖² or None.
    Returns (loss, reward_loss = mean φ(r))."""
    phi = -rewards if kind == "neg" else F.relu(margin - rewards)  # (B,)
    reward_loss = phi.mean()
    loss = reward_coef * reward_loss
    if pretrain_mse is not None:
        loss = loss + pretrain_coef * pretrain_mse
    return loss, reward_loss


def chain_with_grad(unet, cond: dict, sched, x_T, grad_from: int, eta: float, w: float, noise, autocast,
                    checkpointed: bool = True):
    """x_T -> x₀ by the DDIM(η) chain; steps i < grad_from under no_grad (the stop-gradient of DRaFT-K and AlignProp),
    steps i ≥ grad_from with the gradient, each recomputed in the backward pass if `checkpointed`.

    cond: the UNet's inputs for [uncond; cond] (2N rows); sched = chain.ddim_schedule(..) (T,) each; x_T (N, C, h, w);
    noise(shape) draws each step's z (only if η > 0). Returns x₀ (N, C, h, w)."""
    timesteps, alpha_bar, alpha_bar_prev = sched
    n, x = len(x_T), x_T

    def step(x, i):
        with autocast:
            eps = chain.guided_eps(unet, x, timesteps[i].expand(n), cond, w)
        return chain.ddim_transition(eps, x, alpha_bar[i], alpha_bar_prev[i], eta)  # (μ, σ_t)

    for i in range(len(timesteps)):
        if i < grad_from:
            with torch.no_grad():
                mean, std = step(x, i)
        elif checkpointed:
            mean, std = checkpoint(step, x, i, use_reentrant=False)
        else:
            mean, std = step(x, i)
        x = mean + std * noise(x.shape) if eta > 0 else mean  # x_{t-1} = μ + σ_t·z
    return x


def x0_hat(eps, x_t, alpha_bar_t):
    """ReFL's one-step prediction x̂₀ = (x_t - √(1 - ᾱ_t)·ε̂) / √ᾱ_t. (N, C, h, w) -> (N, C, h, w)."""
    return (x_t - (1 - alpha_bar_t).sqrt() * eps.to(x_t.dtype)) / alpha_bar_t.sqrt()


def lv_last_step(unet, cond: dict, sched, x0, n_samples: int, w: float, autocast, noise):
    """DRaFT-LV: x_1^i = √ᾱ_1·x₀ + √(1 - ᾱ_1)·ε_i, then the chain's last step back to x₀^i with the gradient.
    x0 (N, C, h, w) without graph -> (n·N, C, h, w), copy i of the batch in rows i·N .. (i+1)·N - 1."""
    timesteps, alpha_bar, alpha_bar_prev = sched
    x1 = torch.cat([alpha_bar[-1].sqrt() * x0 + (1 - alpha_bar[-1]).sqrt() * noise(x0.shape)
                    for _ in range(n_samples)])  # (n·N, C, h, w)
    with autocast:
        eps = chain.guided_eps(unet, x1, timesteps[-1].expand(len(x1)), repeat_rows(cond, n_samples), w)
    return chain.ddim_transition(eps, x1, alpha_bar[-1], alpha_bar_prev[-1], 0.0)[0]


def repeat_rows(cond: dict, k: int) -> dict:
    """The UNet's inputs for [uncond; cond] of N captions (2N rows) -> those of the batch repeated k times (2kN rows:
    [uncond x k; cond x k], the layout guided_eps reads for x = [x^1; ..; x^k]). SDXL's added_cond_kwargs included."""
    def rep(v):
        return v.view(2, 1, -1, *v.shape[1:]).expand(2, k, -1, *v.shape[1:]).reshape(-1, *v.shape[1:])
    return {name: {m: rep(x) for m, x in v.items()} if isinstance(v, dict) else rep(v) for name, v in cond.items()}


def seed_diversity(images, prompts: list[str]) -> float:
    """Mean over prompts of the mean pairwise RMS pixel distance between that prompt's images (different seeds):
    mean_{i<j} √(mean_pixels (x_i - x_j)²). Falls as a model collapses onto one image per prompt.
    images (N, 3, H, W), prompts N strings."""
    per_prompt = []
    for p in dict.fromkeys(prompts):
        x = images[[k for k, q in enumerate(prompts) if q == p]].flatten(1).float()  # (S, 3·H·W)
        if len(x) < 2:
            continue
        d = ((x[:, None] - x[None]) ** 2).mean(-1).sqrt()  # (S, S)
        per_prompt.append(d[torch.triu_indices(len(x), len(x), 1).unbind()].mean())
    return torch.stack(per_prompt).mean().item() if per_prompt else float("nan")


# ------------------------------------------------------------------------------------------------ helpers


def cat_text(a, b):
    """Stack two text conditionings row-wise: SD1.5's tensor, or SDXL's (hidden, pooled) pair."""
    return tuple(torch.cat([x, y]) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.cat([a, b])


def null_text(model: str, family, tokenizers, text_encoders):
    """The unconditional branch of guidance: the empty prompt's encoding; zeros for an SDXL whose pipeline config says
    force_zeros_for_empty_prompt (SDXL base does), as its pipeline samples."""
    with torch.no_grad():
        text = family.encode_text([""], tokenizers, text_encoders)
    if family is SDXL and family.pipeline_class.load_config(model).get("force_zeros_for_empty_prompt", True):
        text = tuple(torch.zeros_like(x) for x in text)
    return text


def decode_with_grad(vae, latents):
    """x₀ latents (N, 4, h, w) -> images (N, 3, H, W) in [0, 1] with the graph kept (chain.decode has none)."""
    return (vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)


def broadcast_params(params: list, dist: runtime.Dist) -> None:
    """Rank 0's initial weights on every rank (what DDP does when it wraps a model): the LoRA's random init is drawn
    from each rank's own seed."""
    if dist.world_size > 1:
        for p in params:
            tdist.broadcast(p.data, src=0)


def all_reduce_grads(params: list, dist: runtime.Dist) -> None:
    """Average the gradients over ranks. Not DDP: the chain calls the UNet K times before one backward, and DDP's
    hooks allow one call per backward (static_graph would need the same K every step, which AlignProp's is not)."""
    if dist.world_size > 1:
        for p in params:
            if p.grad is not None:
                tdist.all_reduce(p.grad)
                p.grad /= dist.world_size


# ------------------------------------------------------------------------------------------------ main


def main(args: Args) -> Path:
    dist = runtime.setup_distributed()
    device = dist.device
    # ---- guard rails: reject what cannot work before loading anything
    runtime.check_model_path(args.model, "--model")
    family = model_family(args.model)  # common/models.py: SD1.5 or SDXL, chosen once from the UNet's config
    args = resolve(dataclasses.replace(args, resolution=args.resolution or family.resolution))
    T = args.rollout_steps
    require(T >= 1, f"--rollout-steps must be >= 1, got {T}")
    require(0 <= args.backprop_steps <= T, f"--backprop-steps {args.backprop_steps} must be in [0, {T}] (0: all)")
    lo, hi = args.random_backprop
    require(1 <= lo <= hi, f"--random-backprop {lo} {hi}: need 1 <= K_min <= K_max")
    f_lo, f_hi = args.refl_stop_range
    require(0 <= f_lo < f_hi <= 1 and int(f_lo * T) <= -int(-f_hi * T) - 1,
            f"--refl-stop-range {f_lo} {f_hi} must satisfy 0 <= f_lo < f_hi <= 1 and hold a step of the {T}")
    require(args.lv_samples >= 0 and (args.lv_samples == 0 or args.method == "draft"),
            f"--lv-samples {args.lv_samples}: DRaFT-LV is a variant of --method draft, n >= 0")
    require(args.eta >= 0 and args.learning_rate > 0 and args.reward_coef > 0 and args.pretrain_coef >= 0,
            "--eta, --pretrain-coef must be >= 0 and --learning-rate, --reward-coef > 0")
    require(args.pretrain_coef == 0 or args.pretrain_data, "--pretrain-coef > 0 needs --pretrain-data")
    require(min(args.per_device_batch, args.grad_accum, args.steps, args.num_validation_prompts,
                args.checkpoint_every, args.sample_every) >= 1, "--per-device-batch, --grad-accum, --steps, "
            "--num-validation-prompts, --checkpoint-every, --sample-every must be >= 1")
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
        args = dataclasses.replace(args, output_dir=f"runs/draft-{stamp[0]}")
    out = runtime.prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                                     is_main=dist.is_main)

    # ---- models: frozen VAE, text encoders and reward; the UNet with LoRA (or full, against a frozen copy)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no")
    tokenizers, text_encoders = load_text_encoders(args.model, family, device, weight_dtype)
    vae = load_vae(args.model, None, device, torch.float32)  # decoded in fp32: SDXL's VAE overflows fp16
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
    else:  # a full fine-tune keeps a frozen copy of the base for the final comparison
        ref_unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device, weight_dtype)
        ref_unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    broadcast_params(params, dist)  # one starting point; all_reduce_grads then keeps the ranks equal
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    sched = chain.ddim_schedule(scheduler, T, device)  # (timesteps, ᾱ_t, ᾱ_{t-1}), each (T,)
    side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (unet.config.in_channels, side, side)  # (4, 64, 64) at 512 px

    prompts = load_prompts(args.prompts)
    require(len(prompts) > 0 and all(prompts), f"--prompts {args.prompts}: no prompts")
    scorer = load_scorer(args.scorer, args.scorer_path, clip_path=args.clip_path, device=device,
                         dtype=weight_dtype, flags=("--scorer-path", "--clip-path"))
    clip_scorer = None
    if args.clip_score_model != "none":  # what the reward does not see: never trained on
        clip_scorer = load_scorer("clip", args.clip_score_model, device=device, dtype=weight_dtype,
                                  flags=("--clip-score-model", "--clip-score-model"))
    uncond = null_text(args.model, family, tokenizers, text_encoders)  # (1, 77, D) [, (1, P)]
    pretrain = None
    if args.pretrain_coef > 0:
        pretrain = load_captioned_images(args.pretrain_data)
        require(len(pretrain) > 0, f"--pretrain-data {args.pretrain_data}: no images")
        train_scheduler = DDIMScheduler.from_config(scheduler.config)  # the 1000-step q(x_t | x_0) of pre-training

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
    def signals(images) -> dict:
        """The reward and what it does not see, of validation images (K,) in val_prompts' order."""
        rewards = scorer(images, val_prompts).float()
        clip = clip_scorer(images, val_prompts).float() if clip_scorer is not None \
            else torch.full_like(rewards, float("nan"))
        return dict(rewards=rewards, clip=clip, diversity=seed_diversity(images, val_prompts))

    @torch.no_grad()
    def validate(model) -> tuple:
        """The fixed-seed validation images with the training chain (T steps, η, w): image k from a generator
        seeded k."""
        gens = [torch.Generator().manual_seed(k) for k in range(len(val_prompts))]
        noise = lambda shape: torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)  # noqa: E731
        x0 = chain_with_grad(model, val_cond, sched, noise((len(gens), *latent_shape)), T, args.eta,
                             args.guidance_scale, noise, autocast)
        images = chain.decode(vae, x0)
        return images, signals(images)

    def pretrain_loss(gen) -> torch.Tensor:
        """ReFL's L_pre: the denoising loss ‖ε - ε_θ(x'_t, t, c')‖² on a batch of --pretrain-data."""
        rows = torch.randint(len(pretrain), (args.per_device_batch,), generator=gen).tolist()
        items = [pretrain[i] for i in rows]
        pixels = torch.stack([preprocess(decode_image(x["image"]), args.resolution, False) for x in items]).to(device)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(gen_dev) * vae.config.scaling_factor
        eps = torch.randn(latents.shape, generator=gen_dev, device=device)
        t = torch.randint(train_scheduler.config.num_train_timesteps, (len(rows),), generator=gen_dev, device=device)
        text = family.encode_text([x["caption"] for x in items], tokenizers, text_encoders)
        with autocast:
            x_t = train_scheduler.add_noise(latents, eps, t)
            pred = unet(x_t, t, **family.unet_inputs(text, args.resolution)).sample
        return F.mse_loss(pred.float(), eps)

    # ---- state that a checkpoint carries: weights, optimizer, RNG streams
    gen = torch.Generator().manual_seed(args.seed + dist.rank)  # prompts, K, the ReFL stop step
    noise_gen = torch.Generator(device).manual_seed(args.seed + dist.rank)  # x_T and each step's z
    gen_dev = torch.Generator(device).manual_seed(args.seed + 10_000 + dist.rank)  # pre-training noise
    start = 0
    if args.resume:
        start, weights, extra = runtime.load_checkpoint(out, script="draft.py")
        runtime.check_resume_args(extra["args"], args)
        missing = {n for n, p in unet.named_parameters() if p.requires_grad} - set(weights["policy"])
        require(not missing, f"--resume {out}: the checkpoint lacks {len(missing)} trainable tensors "
                f"(e.g. {next(iter(missing), '')}); was it saved with another --lora-rank?")
        unet.load_state_dict(weights["policy"], strict=False)
        optimizer.load_state_dict(extra["optimizer"])
        scaler.load_state_dict(extra["scaler"])
        runtime.set_rng_state(extra["rng"][dist.rank], generators=[gen, noise_gen, gen_dev])
    if dist.is_main:
        runtime.write_args(out, args)
    logger = runtime.MetricsLogger(out, enabled=dist.is_main, resume_step=start if args.resume else None)

    lv = args.lv_samples
    images_per_chain = lv if lv else 1  # reward gradients per chain
    if args.method == "refl":
        window = f"ReFL: no gradient to a stop step s ~ U{{{int(f_lo * T)}..{-int(-f_hi * T) - 1}}}, x̂₀ in one step"
    elif args.method == "alignprop":
        window = f"AlignProp: gradient through the last K ~ U{{{lo}..{min(hi, T)}}} steps"
    else:
        window = (f"DRaFT-LV: n = {lv} re-noised copies of x₀ through the last step" if lv else
                  f"full DRaFT: gradient through all {T} steps" if args.backprop_steps == 0 else
                  f"DRaFT-{args.backprop_steps}: gradient through the last {args.backprop_steps} steps")
    per_step = args.per_device_batch * args.grad_accum * dist.world_size
    if dist.is_main:
        print(f"{window} of a {T}-step DDIM(η {args.eta:g}) chain, w {args.guidance_scale:g} "
              f"({family.pipeline_class.__name__}, {args.resolution} px)\n"
              f"batch: {args.per_device_batch} chains x {args.grad_accum} accumulation x {dist.world_size} GPUs = "
              f"{per_step} chains ({per_step * images_per_chain} reward gradients) per step; {args.steps} steps; "
              f"lr {args.learning_rate:g}, {sum(p.numel() for p in params):,} trainable parameters "
              f"({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full UNet'}); "
              f"loss {args.reward_coef:g}·{'-r' if args.reward_loss == 'neg' else f'relu({args.reward_margin:g} - r)'}"
              + (f" + {args.pretrain_coef:g}·L_pre" if pretrain is not None else ""))

    def save_samples(step: int) -> None:
        images, s = validate(unet)
        captions = [f"{p[:40]} {r:.2f}" for p, r in zip(val_prompts, s["rewards"].tolist())]
        grid = runtime.save_image_grid(images, out / "samples" / f"step_{step:07d}.png", nrow=8, captions=captions,
                                       upscale=max(1, 128 // images.shape[-1]))
        logger.log_images("samples", grid, step)
        logger.log({"rewards/eval_mean": s["rewards"].mean(), "hacking/clip_score": s["clip"].mean(),
                    "hacking/seed_diversity": s["diversity"], "charts/reward_grad_evals": step * per_step
                    * images_per_chain}, step)

    if start == 0 and dist.is_main:
        save_samples(0)  # the base model's grid, reward and hacking signals
    unet.train()
    for step in tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, disable=not dist.is_main):
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(["loss", "reward_loss", "reward", "pretrain_loss", "window"], 0.0)
        for _ in range(args.grad_accum):
            idx = torch.randint(len(prompts), (args.per_device_batch,), generator=gen)
            batch_prompts = [prompts[i] for i in idx.tolist()]
            cond = conditioning(batch_prompts)
            noise = lambda shape: torch.randn(shape, generator=noise_gen, device=device)  # noqa: E731
            x_T = noise((args.per_device_batch, *latent_shape))  # (B, 4, h, w)
            # ---------------- 1. the images with their graph: which steps carry the gradient is the method
            if args.method == "refl":
                s = int(torch.randint(int(f_lo * T), -int(-f_hi * T), (1,), generator=gen))  # steps 0..s-1 no grad
                x_s = chain_with_grad(unet, cond, tuple(x[:s] for x in sched), x_T, s, args.eta, args.guidance_scale,
                                      noise, autocast) if s else x_T
                x_s = x_s.detach()
                with autocast:
                    eps = chain.guided_eps(unet, x_s, sched[0][s].expand(len(x_s)), cond, args.guidance_scale)
                latents, prompts_of, window = x0_hat(eps, x_s, sched[1][s]), batch_prompts, 1
            elif lv:
                with torch.no_grad():
                    x0 = chain_with_grad(unet, cond, sched, x_T, T, args.eta, args.guidance_scale, noise, autocast)
                latents = lv_last_step(unet, cond, sched, x0, lv, args.guidance_scale, autocast, noise)
                prompts_of, window = batch_prompts * lv, 1
            else:
                k = int(torch.randint(lo, min(hi, T) + 1, (1,), generator=gen)) if args.method == "alignprop" \
                    else args.backprop_steps or T
                latents = chain_with_grad(unet, cond, sched, x_T, T - k, args.eta, args.guidance_scale, noise,
                                          autocast, args.checkpoint_chain)
                prompts_of, window = batch_prompts, k
            images = checkpoint(decode_with_grad, vae, latents, use_reentrant=False) if args.checkpoint_chain \
                else decode_with_grad(vae, latents)
            # ---------------- 2. the reward, its loss, and the gradient back through the window
            rewards = differentiable_score(scorer, images, prompts_of).float()  # (B,) or (n·B,)
            pre = pretrain_loss(gen) if pretrain is not None else None
            loss, reward_loss = reward_backprop_loss(rewards, args.reward_loss, args.reward_margin, args.reward_coef,
                                                     pre, args.pretrain_coef)
            scaler.scale(loss / args.grad_accum).backward()
            for name, v in zip(sums, (loss, reward_loss, rewards.mean(), pre if pre is not None else 0.0, window)):
                sums[name] += float(v.detach() if torch.is_tensor(v) else v) / args.grad_accum
        runtime.check_finite(runtime.all_reduce_mean(torch.tensor(sums["loss"], device=device), dist), step, out)
        all_reduce_grads(params, dist)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()

        # ---------------- logging, samples, checkpoints
        metrics = {"losses/loss": sums["loss"], "losses/reward_loss": sums["reward_loss"],
                   "rewards/mean": sums["reward"], "charts/grad_norm": grad_norm, "charts/window_steps": sums["window"],
                   "charts/learning_rate": optimizer.param_groups[0]["lr"],
                   "charts/reward_grad_evals": step * per_step * images_per_chain,
                   "charts/seconds_per_step": time.time() - t0}
        if pretrain is not None:
            metrics["losses/pretrain_loss"] = sums["pretrain_loss"]
        logger.log({k: runtime.all_reduce_mean(v, dist) if isinstance(v, float) else v for k, v in metrics.items()},
                   step)
        if dist.is_main and (step % args.sample_every == 0 or step == args.steps):
            save_samples(step)
        if step % args.checkpoint_every == 0 or step == args.steps:
            trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
            extra = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "args": args,
                     "base_model": args.model}
            runtime.save_checkpoint(out, step, {"policy": trainable}, extra, generators=[gen, noise_gen, gen_dev],
                                    script="draft.py")

    # ---- final weights in diffusers format, and the fixed-seed comparison with the base model
    if dist.is_main:
        unet.eval()
        load = save_final(family, unet, args.lora_rank > 0, args.model, out)
        # evaluate.py's sampler (DDIM --sample-steps, η = 0, image k seeded k), so eval.json and evaluate.py agree
        pipe = make_pipeline(family, args.model, unet, vae, tokenizers, text_encoders,
                             DDIMScheduler.from_config(scheduler.config))
        pipe.set_progress_bar_config(disable=True)

        @torch.no_grad()
        def signals_of(model) -> dict:
            pipe.unet = model
            with autocast:
                images = pipe(val_prompts, num_inference_steps=args.sample_steps, eta=0.0, output_type="pt",
                              guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                              generator=[torch.Generator().manual_seed(k) for k in range(len(val_prompts))]).images
            return signals(images.float().to(device))

        final = signals_of(unet)
        with reference_unet(unet, ref_unet) as ref:
            base = signals_of(ref)
        p_value = scipy.stats.ttest_rel(final["rewards"].cpu(), base["rewards"].cpu(), alternative="greater").pvalue
        result = dict(method=args.method, reward_base=base["rewards"].mean().item(),
                      reward_final=final["rewards"].mean().item(), p_value=float(p_value),
                      clip_score_base=base["clip"].mean().item(), clip_score_final=final["clip"].mean().item(),
                      seed_diversity_base=base["diversity"], seed_diversity_final=final["diversity"],
                      rewards_base=base["rewards"].tolist(), rewards_final=final["rewards"].tolist(),
                      clip_scores_base=base["clip"].tolist(), clip_scores_final=final["clip"].tolist(),
                      reward_grad_evals=args.steps * per_step * images_per_chain,
                      num_validation_prompts=args.num_validation_prompts, validation_prompts=val_prompts,
                      steps=args.steps, sample_steps=args.sample_steps, eta=0.0)
        print(f"fixed-seed reward (DDIM {args.sample_steps} steps, η 0): base {result['reward_base']:.4f} -> final "
              f"{result['reward_final']:.4f} (paired t-test p = {p_value:.2g}); what the reward does not see: CLIP "
              f"score {result['clip_score_base']:.3f} -> {result['clip_score_final']:.3f}, seed diversity "
              f"{result['seed_diversity_base']:.4f} -> {result['seed_diversity_final']:.4f}\nload with:\n    {load}")
        if warning := runtime.below_base_warning(result["reward_final"], result["reward_base"]):
            result["warning"] = warning
        (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.close()
    runtime.barrier()
    runtime.cleanup_distributed()
    return out


if __name__ == "__main__":
    main(parse_args())
