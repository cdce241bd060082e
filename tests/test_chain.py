"""common/chain.py, the denoising chain dpok.py and grpo.py sample from: the DDIM(η) transition against diffusers'
DDIMScheduler.step, a whole sampled chain against diffusers' loop with the same noise, the recorded log-probabilities
against torch.distributions.Normal, the schedule of the last step, and SDXL-style conditioning passed through."""

import types

import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal

from common import chain

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def test_ddim_transition_equals_diffusers_step():
    """μ and σ_t from the module's equations equal diffusers' DDIMScheduler.step(eta=1) (zero and given noise)."""
    sch = DDIMScheduler(**SD15)
    t, ab, ab_prev = chain.ddim_schedule(sch, 10, "cpu")
    g = torch.Generator().manual_seed(0)
    for i in (0, 4, 9):  # first, middle, last (ᾱ_{t-1} = ᾱ_0) step
        x_t, eps, z = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        mean, std = chain.ddim_transition(eps, x_t, ab[i].double(), ab_prev[i].double(), eta=1.0)
        ref_mean = sch.step(eps, t[i], x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
        ref_sample = sch.step(eps, t[i], x_t, eta=1.0, variance_noise=z).prev_sample
        tol = dict(rtol=1e-5, atol=1e-6)  # diffusers forms its coefficients from ᾱ in float32
        torch.testing.assert_close(mean, ref_mean, **tol)
        torch.testing.assert_close(mean + std * z, ref_sample, **tol)
        torch.testing.assert_close(std**2, sch._get_variance(t[i], t[i] - 100).double(), **tol)


def test_schedule_last_step_goes_to_alpha_bar_zero():
    """T steps with SD1.5's 'leading' spacing: 1000/T apart ending at t = 1, and after it ᾱ_{t-1} = ᾱ_0 (what
    ddpo-pytorch's clamp of the previous timestep at 0 gives), not 1."""
    sch = DDIMScheduler(**SD15)
    t, ab, ab_prev = chain.ddim_schedule(sch, 20, "cpu")
    assert t.tolist() == list(range(951, 0, -50))
    torch.testing.assert_close(ab, sch.alphas_cumprod[t])
    torch.testing.assert_close(ab_prev[:-1], sch.alphas_cumprod[t[1:]])
    assert ab_prev[-1] == sch.alphas_cumprod[0] and ab_prev[-1] < 1


class FakeUNet(torch.nn.Module):
    """A deterministic ε-predictor with UNet2DConditionModel's calling convention; counts its calls and, like SDXL's
    UNet, takes an optional added_cond_kwargs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
        self.calls += 1
        cond = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if added_cond_kwargs is not None:
            cond = cond + added_cond_kwargs["text_embeds"].mean(dim=1).view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=torch.tanh(x * (1 + t.view(-1, 1, 1, 1) / 1000) + cond))


def test_sampled_chain_equals_diffusers_loop_and_its_log_probs():
    """A whole T-step chain from sample_trajectories equals diffusers' DDIMScheduler.step loop fed the same guided ε
    and the same noise, and each recorded log-prob is Normal(μ, σ_t)'s density of the drawn x_{t-1}, averaged over
    C, H, W; one guided UNet call per step."""
    T, w, n = 6, 5.0, 3
    sch = DDIMScheduler(**SD15)
    sched = chain.ddim_schedule(sch, T, "cpu")
    t = sched[0]
    cond = {"encoder_hidden_states": torch.randn(2 * n, 5, 7)}  # [uncond; cond]
    zs = torch.randn(T + 1, n, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    draws = iter(zs[1:])
    unet = FakeUNet()
    latents, log_probs, kl = chain.sample_trajectories(unet, cond, sched, zs[0], 1.0, w, lambda shape: next(draws),
                                                       torch.autocast("cpu", enabled=False))
    assert latents.shape == (T + 1, n, 4, 8, 8) and log_probs.shape == (T, n) and unet.calls == T
    assert torch.equal(kl, torch.zeros(n))
    x = zs[0]
    for i in range(T):
        eps_u, eps_c = unet(torch.cat([x, x]), t[i].expand(2 * n), **cond).sample.chunk(2)
        eps = eps_u + w * (eps_c - eps_u)
        mean = sch.step(eps, t[i], x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        std = sch._get_variance(t[i], t[i] - 1000 // T).sqrt()
        x = sch.step(eps, t[i], x, eta=1.0, variance_noise=zs[i + 1]).prev_sample
        torch.testing.assert_close(latents[i + 1], x, rtol=1e-4, atol=1e-5)
        expected = Normal(mean, std).log_prob(latents[i + 1]).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_probs[i], expected, rtol=1e-4, atol=1e-4)


def test_sdxl_conditioning_reaches_the_unet():
    """SDXL's added_cond_kwargs travel with the [uncond; cond] rows: changing the pooled embedding of the conditional
    half changes ε̂, changing nothing else leaves it equal."""
    n = 2
    x, t = torch.randn(n, 4, 8, 8), torch.full((n,), 500)
    cond = {"encoder_hidden_states": torch.randn(2 * n, 5, 7),
            "added_cond_kwargs": {"text_embeds": torch.randn(2 * n, 6), "time_ids": torch.zeros(2 * n, 6)}}
    eps = chain.guided_eps(FakeUNet(), x, t, cond, 5.0)
    again = chain.guided_eps(FakeUNet(), x, t, cond, 5.0)
    moved = {**cond, "added_cond_kwargs": {**cond["added_cond_kwargs"],
                                          "text_embeds": cond["added_cond_kwargs"]["text_embeds"] + 1}}
    assert torch.equal(eps, again) and not torch.allclose(eps, chain.guided_eps(FakeUNet(), x, t, moved, 5.0))
