"""draft.py: the loss against a hand computation (values and gradient), the gradient window of the chain against
AlignProp's official form (ε̂ detached before the window) written out with plain DDIM formulas, ReFL's x̂₀, DRaFT-LV's
last step against a per-copy computation, the seed diversity against a loop, the guard rails, kill -9 then --resume
equal to an uninterrupted run (AlignProp: the random K is part of the resumed state), ReFL with the pre-training loss,
and `--toy` DRaFT-1 end to end: the held-out validation reward rises."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import draft
from test_hardening import assert_same_rows, assert_same_weights, jsonl, kill_during_checkpoint, run_load_line

# ------------------------------------------------------------------------------------------------ the loss


def test_reward_backprop_loss_against_its_equation_values_and_gradient():
    r = torch.tensor([-1.0, 0.5, 1.9, 2.5, 3.0], dtype=torch.float64)
    coef, margin, pre_coef = 0.3, 2.0, 0.7
    for kind in ("neg", "relu"):
        rewards = r.clone().requires_grad_()
        pre = torch.tensor(1.25, dtype=torch.float64, requires_grad=True)
        loss, reward_loss = draft.reward_backprop_loss(rewards, kind, margin, coef, pre, pre_coef)
        loss.backward()
        phi = [-x if kind == "neg" else max(margin - x, 0.0) for x in r.tolist()]
        dphi = [-1.0 if kind == "neg" else (-1.0 if x < margin else 0.0) for x in r.tolist()]
        assert reward_loss.item() == pytest.approx(sum(phi) / 5, rel=1e-12)
        assert loss.item() == pytest.approx(coef * sum(phi) / 5 + pre_coef * 1.25, rel=1e-12)
        torch.testing.assert_close(rewards.grad, torch.tensor([coef * d / 5 for d in dphi], dtype=torch.float64))
        assert pre.grad.item() == pytest.approx(pre_coef)
    loss, _ = draft.reward_backprop_loss(r, "relu", margin, coef)  # no pre-training term
    assert loss.item() == pytest.approx(coef * (3 + 1.5 + 0.1) / 5)


# ------------------------------------------------------------------------------------------------ the chain


class TinyUNet(nn.Module):
    """ε(x, t, c) = tanh(a·x + W·mean(c) + t/1000): nonlinear in x, so the gradient window changes the gradient."""

    def __init__(self, channels=3, dim=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.W = nn.Parameter(0.3 * torch.randn(channels, dim, generator=g, dtype=torch.float64))

    def forward(self, x, t, encoder_hidden_states):
        h = encoder_hidden_states.mean(1) @ self.W.T  # (2N, C)
        return SimpleNamespace(sample=torch.tanh(self.a * x + h[:, :, None, None] + t[:, None, None, None] / 1000))


def schedule(T=4):
    timesteps = torch.arange(T, 0, -1, dtype=torch.float64) * 200 - 50  # 750, 550, 350, 150
    alpha_bar = torch.linspace(0.2, 0.9, T, dtype=torch.float64)
    alpha_bar_prev = torch.cat([alpha_bar[1:], torch.tensor([0.99], dtype=torch.float64)])
    return timesteps, alpha_bar, alpha_bar_prev


def by_hand(unet, cond, sched, x, K, w):
    """AlignProp's official loop (main.py at 7f4503f): ε̂ detached at steps i < T - K, the η = 0 DDIM step by hand."""
    T = len(sched[0])
    for i in range(T):
        t = sched[0][i].expand(2 * len(x))
        e_u, e_c = unet(torch.cat([x, x]), t, cond["encoder_hidden_states"]).sample.chunk(2)
        if i < T - K:
            e_u, e_c = e_u.detach(), e_c.detach()
        eps = e_u + w * (e_c - e_u)
        ab, ab_prev = sched[1][i], sched[2][i]
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    return x


@pytest.mark.parametrize("checkpointed", [True, False])
def test_gradient_window_matches_alignprops_detach_form(checkpointed):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    cond = {"encoder_hidden_states": torch.randn(4, 6, 5, generator=g, dtype=torch.float64)}
    sched, w = schedule(), 3.0
    grads = {}
    for K in (1, 2, 4):
        unet = TinyUNet()
        x0 = draft.chain_with_grad(unet, cond, sched, x_T, 4 - K, 0.0, w, None, torch.autocast("cpu", enabled=False),
                                   checkpointed)
        (x0 ** 2).sum().backward()
        ref_unet = TinyUNet()
        ref = by_hand(ref_unet, cond, sched, x_T, K, w)
        (ref ** 2).sum().backward()
        torch.testing.assert_close(x0, ref)
        for p, q in zip(unet.parameters(), ref_unet.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        grads[K] = unet.a.grad.item()
    assert len({round(v, 8) for v in grads.values()}) == 3  # each window gives another gradient


def test_refl_x0_hat_inverts_the_forward_process():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    ab = torch.tensor(0.37)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(draft.x0_hat(eps, x_t, ab), x0)


def test_lv_last_step_against_one_copy_at_a_time():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    cond = {"encoder_hidden_states": torch.randn(4, 6, 5, generator=g, dtype=torch.float64)}
    sched, w, n = schedule(), 2.0, 3
    noises = torch.randn(n, 2, 3, 2, 2, generator=g, dtype=torch.float64)
    it = iter(noises)
    unet = TinyUNet()
    out = draft.lv_last_step(unet, cond, sched, x0, n, w, torch.autocast("cpu", enabled=False), lambda s: next(it))
    out.pow(2).sum().backward()
    ref_unet = TinyUNet()
    ab, ab_prev, t = sched[1][-1].item(), sched[2][-1].item(), sched[0][-1]
    total = 0
    for i in range(n):
        x1 = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noises[i]
        e_u, e_c = ref_unet(torch.cat([x1, x1]), t.expand(4), cond["encoder_hidden_states"]).sample.chunk(2)
        eps = e_u + w * (e_c - e_u)
        x_prev = math.sqrt(ab_prev) * (x1 - math.sqrt(1 - ab) * eps) / math.sqrt(ab) + math.sqrt(1 - ab_prev) * eps
        torch.testing.assert_close(out[2 * i:2 * i + 2], x_prev)
        total = total + x_prev.pow(2).sum()
    total.backward()
    for p, q in zip(unet.parameters(), ref_unet.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_repeat_rows_keeps_uncond_then_cond_for_sdxl_inputs():
    cond = {"encoder_hidden_states": torch.arange(4.0).view(4, 1),
            "added_cond_kwargs": {"text_embeds": torch.arange(4.0).view(4, 1) + 10, "time_ids": torch.ones(4, 6)}}
    rep = draft.repeat_rows(cond, 3)  # rows [u0 u1] x 3 then [c0 c1] x 3
    assert rep["encoder_hidden_states"].flatten().tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    assert rep["added_cond_kwargs"]["text_embeds"].flatten().tolist() == [10, 11] * 3 + [12, 13] * 3
    assert rep["added_cond_kwargs"]["time_ids"].shape == (12, 6)


def test_seed_diversity_against_a_loop():
    g = torch.Generator().manual_seed(4)
    images = torch.rand(7, 3, 4, 4, generator=g)
    prompts = ["a", "b", "a", "c", "a", "b", "c"]
    per = []
    for p in ("a", "b", "c"):
        xs = [images[k] for k in range(7) if prompts[k] == p]
        pairs = [((xs[i] - xs[j]) ** 2).mean().sqrt().item() for i in range(len(xs)) for j in range(i + 1, len(xs))]
        per.append(sum(pairs) / len(pairs))
    assert draft.seed_diversity(images, prompts) == pytest.approx(sum(per) / 3, rel=1e-6)
    assert draft.seed_diversity(images[[0, 0, 2]], ["a", "a", "b"]) == 0.0  # one image per seed collapsed: 0


def test_guard_rails_name_the_flag(world):
    with pytest.raises(ValueError, match="--lv-samples"):
        draft.main(draft.parse_args(["--toy", "--method", "alignprop", "--lv-samples", "2"]))
    with pytest.raises(ValueError, match="--backprop-steps"):
        draft.main(draft.parse_args(["--toy", "--backprop-steps", "11"]))
    with pytest.raises(ValueError, match="--refl-stop-range"):
        draft.main(draft.parse_args(["--toy", "--method", "refl", "--refl-stop-range", "0.9", "0.5"]))


# ------------------------------------------------------------------------------------------------ end to end

TINY = ["--toy", "--per-device-batch", "2", "--rollout-steps", "3", "--num-validation-prompts", "4",
        "--sample-every", "100", "--checkpoint-every", "1", "--steps", "4", "--sample-steps", "3"]


def test_kill9_resumes_alignprop_to_the_uninterrupted_result_and_the_lora_loads(world, tmp_path, capsys):
    kill_at = random.randint(2, 3)
    argv = [*TINY, "--method", "alignprop", "--random-backprop", "1", "3"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    draft.main(draft.parse_args([*argv, "--output-dir", str(whole)]))
    printed = capsys.readouterr().out
    kill_during_checkpoint("draft.py", kill_at, [*argv, "--output-dir", str(cut)], cut)
    draft.main(draft.parse_args([*argv, "--output-dir", str(cut), "--resume"]))
    train = lambda out: [r for r in jsonl(out / "metrics.jsonl", "charts/seconds_per_step")  # noqa: E731
                         if "losses/loss" in r]
    rows = train(whole)
    assert len(rows) == 4 and all(r["charts/window_steps"] in (1, 2, 3) for r in rows)  # K ~ U{1..3} per step
    assert_same_rows(train(cut), rows, f"killed at step {kill_at}")
    assert json.loads((cut / "eval.json").read_text()) == json.loads((whole / "eval.json").read_text())
    lora = "final/lora/pytorch_lora_weights.safetensors"
    assert_same_weights(whole / lora, cut / lora)
    run_load_line(printed, "load with:", tmp_path)


def test_refl_with_the_pretraining_loss_and_draft_lv_run(world, tmp_path):
    refl = draft.main(draft.parse_args([*TINY, "--method", "refl", "--pretrain-coef", "1.0", "--steps", "2",
                                        "--output-dir", str(tmp_path / "refl")]))
    rows = [r for r in jsonl(refl / "metrics.jsonl", "") if "losses/loss" in r]
    assert len(rows) == 2 and all(r["losses/pretrain_loss"] > 0 and r["charts/window_steps"] == 1 for r in rows)
    for r in rows:  # relu(2 - r) with the toy reward in [0, 1] is 2 - r; the pre-training loss added with λ_pre = 1
        assert r["losses/reward_loss"] == pytest.approx(2 - r["rewards/mean"], rel=1e-5)
        assert r["losses/loss"] == pytest.approx(r["losses/reward_loss"] + r["losses/pretrain_loss"], rel=1e-5)
    assert (refl / "final" / "unet").is_dir()  # ReFL fine-tunes the whole UNet
    lv = draft.main(draft.parse_args([*TINY, "--lv-samples", "2", "--steps", "1",
                                      "--output-dir", str(tmp_path / "lv")]))
    row = [r for r in jsonl(lv / "metrics.jsonl", "") if "losses/loss" in r][0]
    assert row["charts/reward_grad_evals"] == 4 and math.isfinite(row["losses/loss"])  # 2 chains x n = 2


def test_toy_draft1_raises_the_validation_reward_and_logs_the_hacking_signals(world, tmp_path):
    """The held-out true toy reward on the toy VALIDATION prompts (never trained on), 48 fixed seeds, evaluate.py's
    sampler: DRaFT-1 beats the base; the CLIP score and the seed diversity are measured for both."""
    out = draft.main(draft.parse_args(["--toy", "--steps", "12", "--sample-every", "12", "--checkpoint-every", "12",
                                       "--output-dir", str(tmp_path / "run")]))
    result = json.loads((out / "eval.json").read_text())
    assert len(result["rewards_final"]) == 48
    assert set(result["validation_prompts"]).isdisjoint(set(open(draft.toy_defaults().prompts).read().splitlines()))
    assert result["reward_final"] > result["reward_base"] and result["p_value"] < 0.05
    for key in ("clip_score_base", "clip_score_final", "seed_diversity_base", "seed_diversity_final"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "rewards/eval_mean" in r]
    assert [r["charts/reward_grad_evals"] for r in evals] == [0, 12 * 8]


def test_sdxl_draft_lv_and_refl_run_on_the_toy_sdxl(world, tmp_path):
    """SDXL's inputs (added_cond_kwargs) through the chain, DRaFT-LV's repeated rows and ReFL's pre-training loss."""
    from common.toy import toy_sdxl_pipeline

    sdxl = ["--model", str(toy_sdxl_pipeline()), "--steps", "1", "--checkpoint-every", "1"]
    for name, extra in (("lv", ["--lv-samples", "2"]), ("refl", ["--method", "refl", "--pretrain-coef", "1"])):
        out = draft.main(draft.parse_args([*TINY, *sdxl, *extra, "--output-dir", str(tmp_path / name)]))
        row = [r for r in jsonl(out / "metrics.jsonl", "") if "losses/loss" in r][0]
        assert math.isfinite(row["losses/loss"]) and row["charts/grad_norm"] > 0, name
        assert math.isfinite(json.loads((out / "eval.json").read_text())["reward_final"])
