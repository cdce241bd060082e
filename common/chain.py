"""The denoising chain as a decision process: the stochastic DDIM(η) sampler with the log-probability of every step.

dpok.py and grpo.py both train on trajectories x_T .. x_0 drawn from the model itself; this module holds what they
share and nothing of either method (no loss, no advantage, no buffer). With η > 0 each DDIM step is a Gaussian
(Song et al. 2021, https://arxiv.org/abs/2010.02502, eqs. 12 and 16):

    p_θ(x_{t-1} | x_t, c) = N(μ_θ, σ_t² I)
    σ_t = η · √((1 - ᾱ_{t-1}) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_{t-1}))
    x̂₀  = (x_t - √(1 - ᾱ_t) · ε̂) / √ᾱ_t
    μ_θ = √ᾱ_{t-1} · x̂₀ + √(1 - ᾱ_{t-1} - σ_t²) · ε̂,      ε̂ = ε_θ(x_t, ∅) + w · (ε_θ(x_t, c) - ε_θ(x_t, ∅))

so a trajectory's probability is the product of its T transitions, each with a closed-form log-density
(common/kernels.py gaussian_log_prob: averaged over C·H·W, as DDPO's, DPOK's and DanceGRPO's code do).
ddpo-pytorch's ddim_step_with_logprob and DanceGRPO's copy of it compute the same μ and σ from a DDIMScheduler;
tests/test_chain.py checks `ddim_transition` against diffusers' DDIMScheduler.step with the same noise.

The UNet's conditioning is a dict of keyword inputs for the 2N rows [unconditional; conditional] (common/models.py
`unet_inputs`: SD1.5's encoder_hidden_states, or SDXL's with its added_cond_kwargs), so one sampler serves both
model families.
"""

import torch

from common import kernels
from common.runtime import reference_unet


def ddim_schedule(scheduler, steps: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(timesteps, ᾱ_t, ᾱ_{t-1}), each (T,), of a T-step DDIM over the scheduler's noise schedule.

    Timesteps descend with the scheduler's own spacing (SD1.5's 'leading' with steps_offset 1: 981, 961, .., 1). The
    step before t is t - 1000 // T; after the last step ᾱ_{t-1} is the scheduler's final_alpha_cumprod (ᾱ_0 for SD's
    set_alpha_to_one=False; ddpo-pytorch clamps the previous timestep at 0, the same value).
    """
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps  # (T,) descending
    prev = timesteps - scheduler.config.num_train_timesteps // steps
    alpha_bar = scheduler.alphas_cumprod[timesteps]  # ᾱ_t (T,)
    alpha_bar_prev = torch.where(prev >= 0, scheduler.alphas_cumprod[prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    return timesteps.to(device), alpha_bar.to(device), alpha_bar_prev.to(device)


def ddim_transition(eps, x_t, alpha_bar_t, alpha_bar_prev, eta: float):
    """Mean and std of the DDIM(η) transition p(x_{t-1} | x_t) = N(μ, σ_t² I) (Song et al. 2021, eqs. 12 and 16).

    eps, x_t (N, C, H, W): the guided ε̂ and the current latent; alpha_bar_t, alpha_bar_prev: ᾱ_t, ᾱ_{t-1}, (N, 1, 1, 1)
    or scalars (ᾱ_{t-1} of the last step is ᾱ_0, SD1.5's set_alpha_to_one=False). Returns (μ (N, C, H, W), σ_t).
    """
    eps = eps.to(x_t.dtype)  # the step in the latents' fp32 whatever the UNet's autocast dtype: log p not in bf16
    std = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()  # σ_t
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # x̂₀
    mean = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - std**2).clamp(min=0).sqrt() * eps  # μ
    return mean, std


def guided_eps(unet, x_t, t, cond: dict, w: float):
    """ε̂ = ε(x_t, ∅) + w · (ε(x_t, c) - ε(x_t, ∅)), both from one UNet call on [x_t; x_t].

    cond: the UNet's keyword inputs for the 2N rows [uncond; cond] (e.g. {"encoder_hidden_states": (2N, 77, D)}).
    x_t (N, C, H, W), t (N,) -> (N, C, H, W).
    """
    eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), **cond).sample.chunk(2)
    return eps_uncond + w * (eps_cond - eps_uncond)


@torch.no_grad()
def sample_trajectories(unet, cond: dict, sched, x_T, eta: float, guidance_scale: float, noise, autocast,
                        ref_unet=None, with_kl: bool = False):
    """Trajectories x_T .. x_0 from the policy, each transition's log-probability recorded as it is drawn.

    cond: the UNet's inputs for [uncond; cond] (2N rows); sched = ddim_schedule(..); x_T (N, C, H, W) the starting
    noise; `noise(shape)` draws the standard normals of each step. with_kl also runs the reference p_pre (the LoRA
    UNet with its adapters off, or `ref_unet`) and sums the exact per-step KL(p_θ ‖ p_pre).
    Returns latents (T+1, N, C, H, W), log_probs (T, N), and the KL Σ_t KL_t (N,) (zeros without with_kl).
    """
    timesteps, alpha_bar, alpha_bar_prev = sched
    n, x = len(x_T), x_T
    latents, log_probs, kl = [x], [], torch.zeros(n, device=x.device)
    for i, t in enumerate(timesteps):
        with autocast:
            eps = guided_eps(unet, x, t.expand(n), cond, guidance_scale)
        mean, std = ddim_transition(eps, x, alpha_bar[i], alpha_bar_prev[i], eta)
        if with_kl:
            with autocast, reference_unet(unet, ref_unet) as ref:
                eps_ref = guided_eps(ref, x, t.expand(n), cond, guidance_scale)
            mean_ref, _ = ddim_transition(eps_ref, x, alpha_bar[i], alpha_bar_prev[i], eta)
            kl += kernels.gaussian_kl(mean, mean_ref, std)
        x = mean + std * noise(x.shape)  # x_{t-1} ~ N(μ, σ_t²)
        log_probs.append(kernels.gaussian_log_prob(x, mean, std))
        latents.append(x)
    return torch.stack(latents), torch.stack(log_probs), kl


@torch.no_grad()
def decode(vae, latents):
    """x_0 latents (N, 4, h, w) -> images (N, 3, H, W) in [0, 1], float32."""
    return (vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)
