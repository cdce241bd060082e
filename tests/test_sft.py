"""sft.py: the loss against its formula (reward weighting, each regulariser), the reward weights, the data order
under DDP and resume, and --toy end to end: reward-weighted SFT raises the toy reward of fixed-seed samples."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.runtime import Dist
from sft import main, micro_batches, reward_weights, sft_loss, toy_defaults

REPO = Path(__file__).resolve().parent.parent


def _mse(a, b):  # independent of common.kernels: per-sample mean over C, H, W
    return ((a - b) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("reg", ["none", "pretrain", "kl"])
def test_sft_loss_matches_formula(reg):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    w = torch.rand(6, generator=g, dtype=torch.float64) * 2
    coef = 0.7
    reg_pred = reg_target = None
    expected = (w * _mse(pred, target)).sum() / 6
    if reg == "pretrain":  # a second batch of another size: ε_θ on pre-training data vs its noise
        reg_pred = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
        reg_target = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        expected = expected + coef * _mse(reg_pred, reg_target).sum() / 3
    elif reg == "kl":  # the same predictions against the frozen model's
        reg_pred, reg_target = pred, torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
        expected = expected + coef * _mse(pred, reg_target).sum() / 6
    loss, mse, reg_value = sft_loss(pred, target, w, reg_pred, reg_target, coef if reg != "none" else 0.0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(mse, _mse(pred, target))
    inputs = [pred] + ([reg_pred] if reg == "pretrain" else [])
    for got, want in zip(torch.autograd.grad(loss, inputs, retain_graph=True), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want)
    if reg == "none":  # unit weights: the official --sft loss, F.mse_loss over everything
        plain, _, zero = sft_loss(pred, target, torch.ones(6, dtype=torch.float64))
        torch.testing.assert_close(plain, torch.nn.functional.mse_loss(pred, target))
        assert zero.item() == 0.0


def test_sft_loss_compiled_matches_eager():
    from common.kernels import compiled

    g = torch.Generator().manual_seed(1)
    pred, target, ref = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    w = torch.rand(4, generator=g)
    for reg_pred, reg_target in ((None, None), (pred, ref)):
        eager = sft_loss(pred, target, w, reg_pred, reg_target, 0.5)
        fast = compiled(sft_loss)(pred, target, w, reg_pred, reg_target, 0.5)
        for a, b in zip(eager, fast):
            torch.testing.assert_close(a, b)


def test_reward_weights():
    r = torch.tensor([0.1, 0.2, 0.3, 0.6])
    torch.testing.assert_close(reward_weights(r, "raw", 0.5), r / r.mean())
    torch.testing.assert_close(reward_weights(r, "minmax", 0.5), torch.tensor([0.0, 0.2, 0.4, 1.0]) / 0.4)
    torch.testing.assert_close(reward_weights(r, "binary", 0.5), torch.tensor([0.0, 0.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="minmax"):  # a negative weight would push away without bound
        reward_weights(r - 0.2, "raw", 0.5)


def test_micro_batches_ddp_and_resume():
    def take(rank, world, batch, start, k):
        it = micro_batches(50, batch, rank, world, seed=3, start=start)
        return [next(it) for _ in range(k)]

    single = take(0, 1, 8, 0, 13)  # 6 micro-batches per epoch: crosses 2 epochs
    assert [a + b for a, b in zip(take(0, 2, 4, 0, 13), take(1, 2, 4, 0, 13))] == single  # 2 GPUs x 4 = 1 x 8
    assert take(0, 1, 8, 5, 8) == single[5:]  # resuming at micro-step 5 continues the same stream
    epoch0 = [i for batch in single[:6] for e, i in batch]
    assert len(set(epoch0)) == len(epoch0) == 48 and {e for batch in single[6:12] for e, _ in batch} == {1}


@pytest.fixture(scope="module")
def generated_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sft_generated")


@pytest.mark.slow  # minutes of toy training: CI's second step (pytest.ini, README "Tests")
def test_toy_reward_weighted_sft_raises_reward(world, generated_dir, tmp_path):
    """`sft.py --toy` (the reward-weighted baseline) against the base model, on the same fixed seeds."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from scipy import stats

    from common.toy import PROMPTS, toy_reward

    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "sft.py"), "--toy", "--output-dir", str(out), "--generated-dir",
           str(generated_dir)]
    subprocess.run(cmd, check=True, cwd=REPO)
    for f in ("args.json", "metrics.jsonl", "samples/step_0000000.png", "final/unet/config.json"):
        assert (out / f).exists(), f
    assert len(list(generated_dir.glob("*/meta.json"))) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(v is not None for row in rows for v in row.values())
    summary = json.loads((out / "eval.json").read_text())  # the script's own comparison, on the grid's seeds
    assert summary["eval/reward_final"] > summary["eval/reward_base"]

    def rewards(unet):
        pipe = StableDiffusionPipeline.from_pretrained(world.pipeline, **({"unet": unet} if unet else {}))
        pipe.set_progress_bar_config(disable=True)
        prompts = PROMPTS * 4
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]  # not the training seeds
        with torch.no_grad():
            images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, generator=gens, output_type="pt",
                          height=world.resolution, width=world.resolution).images
        return toy_reward(images, prompts)

    base, tuned = rewards(None), rewards(UNet2DConditionModel.from_pretrained(out / "final" / "unet"))
    p = stats.ttest_rel(tuned, base, alternative="greater").pvalue
    print(f"toy reward: base {base.mean():.4f}, reward-weighted SFT {tuned.mean():.4f}, paired t-test p = {p:.2g}")
    assert tuned.mean() > base.mean() and p < 0.05


def test_toy_resume_is_exact_with_lora_and_kl(world, generated_dir, tmp_path):
    """LoRA + the KL regulariser (reference = the same UNet, adapters off): 4 steps in one go equal 2 + resumed 2;
    the generated set is reused from the cache, and the LoRA loads with diffusers' load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    base = dataclasses.replace(toy_defaults(), lora_rank=4, reg="kl", per_device_batch=8, grad_accum=2, log_every=1,
                               checkpoint_every=2, num_validation_prompts=0, reward_seeds=0,
                               generated_dir=str(generated_dir))
    main(dataclasses.replace(base, steps=4, output_dir=str(tmp_path / "a")))
    main(dataclasses.replace(base, steps=2, output_dir=str(tmp_path / "b")))
    main(dataclasses.replace(base, steps=4, output_dir=str(tmp_path / "b"), resume=True))

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["losses/loss"], r["losses/reg"]) for r in rows if "losses/loss" in r}

    a, b = losses("a"), losses("b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-9), step
    assert a[1][1] == pytest.approx(0.0, abs=1e-10)  # LoRA B starts at 0: ε_θ = ε_pre at the first step
    assert a[4][1] > 0  # and the KL grows once the adapters move
    pipe = StableDiffusionPipeline.from_pretrained(world.pipeline)
    pipe.load_lora_weights(tmp_path / "a" / "final" / "lora")


def test_two_processes_equal_one(world, generated_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) x 8 images = 1 process x 16, with both data streams of --reg pretrain."""
    from safetensors.torch import load_file

    flags = dict(reg="pretrain", grad_accum=2, steps=2, log_every=1, num_validation_prompts=0, reward_seeds=0,
                 generated_dir=str(generated_dir))
    main(dataclasses.replace(toy_defaults(), per_device_batch=16, output_dir=str(tmp_path / "one"), **flags))
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "sft.py"),
                    "--toy", "--per-device-batch", "8", "--output-dir", str(tmp_path / "two"), *cli],
                   check=True, cwd=REPO)
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")}
    # 2 processes sum in another order than 1: float32 rounding grows like √n·ε over a sum of n terms (Higham 2002,
    # §4.2); the loss sums over a micro-batch's latents (16 x 4 x 8 x 8), the gradient over every weight.
    import math

    num_weights = sum(v.numel() for v in load_file(world.pipeline / "unet" / "diffusion_pytorch_model.safetensors")
                      .values())
    rtol = math.sqrt(num_weights) * torch.finfo(torch.float32).eps
    for a, b in zip(rows["one"], rows["two"], strict=True):
        for key in ("losses/loss", "losses/mse", "losses/reg"):
            assert a[key] == pytest.approx(b[key], rel=rtol), (a["step"], key)
    one, two = (load_file(tmp_path / run / "final/unet/diffusion_pytorch_model.safetensors") for run in ("one", "two"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


def test_toy_preferred_with_pretrain_regulariser(world, tmp_path):
    """--data preferred (Pick-a-Pic winners) with Lee et al.'s pre-training regulariser runs and reloads."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    main(dataclasses.replace(toy_defaults(), data="preferred", reg="pretrain", reg_coef=0.5, per_device_batch=8,
                             steps=3, log_every=1, num_validation_prompts=0, reward_seeds=0, output_dir=str(out)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "losses/loss" in r][-1]
    assert last["losses/reg"] > 0
    assert last["losses/loss"] == pytest.approx(last["losses/weighted_mse"] + 0.5 * last["losses/reg"], rel=1e-5)
    UNet2DConditionModel.from_pretrained(out / "final" / "unet")


@pytest.mark.parametrize("change, flag", [(dict(scorer="none"), "--scorer"), (dict(reg="pretrain", pretrain_data=None),
                                          "--pretrain-data"), (dict(prompt_dropout=1.0), "--prompt-dropout"),
                                          (dict(per_device_batch=5, grad_accum=None), "--grad-accum")])
def test_invalid_settings_are_rejected_with_the_flag_named(world, change, flag, tmp_path):
    with pytest.raises(ValueError, match=flag):
        main(dataclasses.replace(toy_defaults(), output_dir=str(tmp_path), **change))


def test_nan_loss_stops_with_the_last_good_checkpoint(world, generated_dir, tmp_path, monkeypatch):
    import sft
    from common.runtime import load_checkpoint

    calls = []

    def poisoned(*args, **kwargs):  # finite for the first 2 steps, NaN from the 3rd
        loss, mse, reg = sft_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 2 else loss), mse, reg

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    args = dataclasses.replace(toy_defaults(), per_device_batch=8, steps=4, checkpoint_every=2, reward_seeds=0,
                               num_validation_prompts=0, generated_dir=str(generated_dir), output_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match="step 3.*step_0000002"):
        main(args)
    step, weights, _ = load_checkpoint(tmp_path)
    assert step == 2 and all(torch.isfinite(v).all() for v in weights["unet"].values())


def test_preferred_lr_is_labelled_as_ours_not_official(capsys):
    """The official train.py has one --learning_rate default, 1e-8 per image, and no SFT launcher: `--help` must not
    call the preferred recipe's 1e-9 official."""
    import sft

    with pytest.raises(SystemExit):
        sft.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1e-9 preferred, ours" in text and "1e-9 preferred, official" not in text
    assert sft.RECIPES["preferred"]["learning_rate"] == 1e-9


def test_generated_set_is_keyed_by_the_scorers_weights_not_its_path(world, tmp_path):
    """A reward model retrained into the same --scorer-path: the generated set's rewards are computed afresh (a new
    set beside the old one, the same images, other rewards). Before, the set was keyed by the path's string and the
    old rewards were reused."""
    from common.scorers import RewardMLP, save_reward_model
    from sft import load_generated

    def train_reward_model(seed: int) -> None:  # the same folder, the same file sizes, other weights
        torch.manual_seed(seed)
        save_reward_model(tmp_path / "rm", RewardMLP(32), dict(clip=str(world.clip), embed_dim=32, hidden_dim=512,
                                                               num_hidden_layers=3))

    args = dataclasses.replace(toy_defaults(), scorer="reward-model", scorer_path=str(tmp_path / "rm"), num_images=8,
                               steps=1, per_device_batch=4, sample_steps=2, num_validation_prompts=0, reward_seeds=0,
                               generated_dir=str(tmp_path / "generated"), output_dir=str(tmp_path / "run"))
    train_reward_model(0)
    main(args)
    train_reward_model(1)
    main(dataclasses.replace(args, overwrite=True))
    sets = [load_generated(meta.parent) for meta in (tmp_path / "generated").glob("*/meta.json")]
    assert len(sets) == 2
    (rows_a, rewards_a), (rows_b, rewards_b) = sets
    assert rows_a["image"] == rows_b["image"] and not torch.equal(rewards_a, rewards_b)
