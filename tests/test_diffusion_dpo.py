"""Tests for diffusion_dpo.py: the loss against an independent computation, the pair structure of a batch (shared t,
ε and prompt dropout), the LoRA reference, the data order under DDP and resume, and the script end to end on the toy
world: held-out implicit accuracy and toy reward rise, 2 processes equal 1, a resumed run equals an uninterrupted one.

    python -m pytest tests/test_diffusion_dpo.py
"""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import diffusion_dpo as dd
from common.runtime import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
# A few toy steps on a small slice of the data, no sample grids or reward samples: the runs below take seconds. The
# learning rate is high enough that θ leaves the reference at once, so no implicit-accuracy sign rests on rounding.
QUICK = ["--toy", "--steps", "6", "--per-device-batch", "4", "--max-pairs", "64", "--log-every", "1",
         "--learning-rate", "1e-5", "--warmup-steps", "0",
         "--eval-pairs", "8", "--eval-draws", "1", "--num-validation-prompts", "0", "--reward-seeds", "0"]


def run(out: Path, *flags: str) -> dict:
    return dd.main(dd.parse_args([*QUICK, "--output-dir", str(out), *flags]))


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the one wall-clock metric."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "charts/pairs_per_second"} for r in rows]


def float32_rtol(num_terms: int) -> float:
    """Relative tolerance between two float32 computations of one quantity that sum `num_terms` terms in different
    orders (2 processes all-reducing against 1; another CPU's vector width): rounding grows like √n·ε (Higham,
    "Accuracy and Stability of Numerical Algorithms", 2002, §4.2, the probabilistic bound). A fixed 1e-5 failed on
    another 2-core machine (grad_norm 1496.0265 vs 1496.0416, 1.01e-5)."""
    return math.sqrt(num_terms) * torch.finfo(torch.float32).eps


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- the loss


def test_loss_matches_independent_formula():
    B, beta = 5, 5000.0
    target = randn(2 * B, 4, 8, 8, seed=0)
    ref_pred = target + 0.3 * randn(2 * B, 4, 8, 8, seed=1)
    model_pred = ref_pred + 0.01 * randn(2 * B, 4, 8, 8, seed=2)  # near the reference: |inside| of order 1
    loss, inside, m = dd.diffusion_dpo_loss(model_pred, ref_pred, target, beta)

    mse = lambda p, i: float(np.mean((p[i].numpy() - target[i].numpy()) ** 2))  # noqa: E731
    expected_inside = [-beta / 2 * ((mse(model_pred, i) - mse(ref_pred, i)) - (mse(model_pred, B + i) - mse(ref_pred, B + i)))
                       for i in range(B)]
    expected_loss = np.mean([math.log1p(math.exp(-x)) for x in expected_inside])  # -log σ(x)
    np.testing.assert_allclose(inside.numpy(), expected_inside, rtol=1e-9)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9)
    assert m["losses/implicit_acc"].item() == pytest.approx(np.mean(np.array(expected_inside) > 0))
    assert m["rewards/margin"].item() == pytest.approx(np.mean(expected_inside), rel=1e-9)
    assert (m["rewards/winner"] - m["rewards/loser"]).item() == pytest.approx(np.mean(expected_inside), rel=1e-6)
    assert m["losses/mse_model_w"].item() == pytest.approx(np.mean([mse(model_pred, i) for i in range(B)]), rel=1e-9)


def test_loss_is_ln2_at_reference_and_swapping_flips_inside():
    target, pred = randn(8, 4, 8, 8, seed=3), randn(8, 4, 8, 8, seed=4)
    loss, inside, m = dd.diffusion_dpo_loss(pred, pred.clone(), target, 5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert m["losses/implicit_acc"].item() == 0.0  # inside == 0 is not > 0

    model_pred = pred + 0.01 * randn(8, 4, 8, 8, seed=5)
    swap = lambda x: torch.cat([x[4:], x[:4]])  # noqa: E731  losers first
    _, inside, _ = dd.diffusion_dpo_loss(model_pred, pred, target, 5000.0)
    _, inside_swapped, _ = dd.diffusion_dpo_loss(swap(model_pred), swap(pred), swap(target), 5000.0)
    torch.testing.assert_close(inside_swapped, -inside)


def test_loss_compiled_equals_eager():
    # float64, so that β/2 = 2500 times a float32 rounding difference between the two paths cannot hide a real one
    target, ref_pred = randn(6, 4, 8, 8, seed=7), randn(6, 4, 8, 8, seed=8)
    model_pred = (ref_pred + 0.01 * randn(6, 4, 8, 8, seed=9)).requires_grad_()
    eager = dd.diffusion_dpo_loss(model_pred, ref_pred, target, 5000.0)
    (grad_eager,) = torch.autograd.grad(eager[0], model_pred)
    compiled = dd.diffusion_dpo_loss(model_pred, ref_pred, target, 5000.0, compile=True)
    (grad_compiled,) = torch.autograd.grad(compiled[0], model_pred)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    torch.testing.assert_close(grad_compiled, grad_eager)


# ---------------------------------------------------------------- the pair structure of a batch


def test_pair_shares_noise_timestep_and_dropout(world):
    B, scaling = 3, 0.5
    scheduler = DDPMScheduler.from_pretrained(world.pipeline, subfolder="scheduler")
    t, eps, z, drop = dd.draw_noise(torch.Generator().manual_seed(0), B, (4, 8, 8), 0.5, 1000)
    moments = torch.cat([randn(2 * B, 4, 8, 8, seed=6), torch.full((2 * B, 4, 8, 8), -4.0, dtype=torch.float64)], 1)
    x_t, t2, eps2 = dd.noisy_pairs(moments, t, eps, z.flatten(0, 1), scheduler, scaling)
    assert torch.equal(t2[:B], t2[B:]) and torch.equal(t2[:B], t)
    assert torch.equal(eps2[:B], eps2[B:])
    # x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε with x_0 = (μ + σ·z)·scaling, computed here from the formula
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[t2]
    x_0 = (moments[:, :4] + math.exp(-2.0) * z.flatten(0, 1)) * scaling
    expected = alpha_bar.sqrt().view(-1, 1, 1, 1) * x_0 + (1 - alpha_bar).sqrt().view(-1, 1, 1, 1) * eps2
    torch.testing.assert_close(x_t.double(), expected, rtol=1e-5, atol=1e-5)

    tokenizer = CLIPTokenizer.from_pretrained(world.pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(world.pipeline, subfolder="text_encoder")
    captions = ["a red circle on a white background", "a blue square on a black background",
                "a green circle on a gray background"]
    drop = torch.tensor([True, False, False])
    emb = dd.pair_embeddings(captions, drop, tokenizer, text_encoder)
    assert emb.shape[0] == 2 * B
    torch.testing.assert_close(emb[:B], emb[B:])  # winner and loser see the same condition
    empty = dd.pair_embeddings([""], torch.tensor([False]), tokenizer, text_encoder)[0]
    torch.testing.assert_close(emb[0], empty)  # dropped: the caption became ""
    assert not torch.allclose(emb[1], empty)
    cache = {}
    torch.testing.assert_close(dd.pair_embeddings(captions, drop, tokenizer, text_encoder, cache), emb)
    assert set(cache) == {"", captions[1], captions[2]}


def test_micro_batches_split_one_global_order_and_resume_anywhere():
    take = lambda gen, n: list(itertools.islice(gen, n))  # noqa: E731
    single = take(dd.micro_batches(20, 4, 0, 1, seed=3, start=0), 12)  # 5 micro-batches per epoch
    ranks = [take(dd.micro_batches(20, 2, r, 2, seed=3, start=0), 12) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single  # 2 ranks × 2 pairs = the single process's 4 pairs
    first_epoch = [i for batch in single[:5] for _, i in batch]
    assert sorted(first_epoch) == list(range(20)) and single[5][0][0] == 1  # a permutation, then epoch 1
    assert take(dd.micro_batches(20, 4, 0, 1, seed=3, start=7), 5) == single[7:12]  # resume needs only the step


def test_lora_reference_is_the_base_unet(world):
    base = UNet2DConditionModel.from_pretrained(world.pipeline, subfolder="unet")
    unet = UNet2DConditionModel.from_pretrained(world.pipeline, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # as after training; at init lora_B = 0
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        trained = unet(x, t, emb).sample
        with dd.reference_unet(unet, None) as ref:
            reference = ref(x, t, emb).sample
        after = unet(x, t, emb).sample
        expected = base(x, t, emb).sample
    torch.testing.assert_close(reference, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(trained, expected, atol=1e-3)
    torch.testing.assert_close(after, trained)  # adapters are back on
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------- the script end to end


def test_toy_run_aligns_the_model(toy_dpo_run, world):
    out = toy_dpo_run
    result = json.loads((out / "eval.json").read_text())
    print(json.dumps(result, indent=2))
    assert result["eval/implicit_acc"] > 0.6  # held-out pairs; chance is 0.5
    assert result["eval/reward_final"] > result["eval/reward_base"]
    assert result["eval/reward_pvalue"] < 0.01

    labels = pq.read_table(world.pickapic / "train" / "part-0.parquet", columns=["label_0"]).column("label_0")
    assert result["train_pairs"] == sum(label != 0.5 for label in labels.to_pylist())  # ties dropped

    rows = [r for r in metrics(out) if "losses/loss" in r]
    assert rows[0]["step"] == 1 and rows[0]["losses/loss"] == pytest.approx(math.log(2), abs=1e-6)  # θ = ref
    assert rows[0]["losses/implicit_acc"] == 0.0
    late = [r for r in rows if r["step"] > rows[-1]["step"] // 2]
    assert np.mean([r["losses/loss"] for r in late]) < math.log(2)
    assert np.mean([r["losses/implicit_acc"] for r in late]) > 0.6

    unet = UNet2DConditionModel.from_pretrained(out / "final" / "unet")  # diffusers format, loads elsewhere
    base = UNet2DConditionModel.from_pretrained(world.pipeline, subfolder="unet")
    assert not torch.equal(unet.conv_out.weight, base.conv_out.weight)
    assert (out / "samples" / "step_0000000.png").exists() and (out / "samples" / f"step_{result['steps']:07d}.png").exists()
    assert (out / "checkpoints" / "latest").exists() and any((out / "tb").iterdir())
    assert json.loads((out / "args.json").read_text())["beta"] == 5000.0


def test_resumed_lora_run_equals_uninterrupted(tmp_path):
    flags = ["--lora-rank", "4", "--checkpoint-every", "3"]
    run(tmp_path / "full", *flags)
    assert run(tmp_path / "split", *flags, "--stop-at-step", "4") == {"stopped_at": 4}
    run(tmp_path / "split", *flags, "--resume")
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert full[0]["losses/loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts at the reference
    assert [r["step"] for r in split] == [r["step"] for r in full]
    for a, b in zip(full, split):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    lora_a = load_file(tmp_path / "full" / "final" / "lora" / "pytorch_lora_weights.safetensors")
    lora_b = load_file(tmp_path / "split" / "final" / "lora" / "pytorch_lora_weights.safetensors")
    assert lora_a.keys() == lora_b.keys()
    for k in lora_a:
        torch.testing.assert_close(lora_a[k], lora_b[k], rtol=1e-6, atol=1e-8)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(dd.toy_world().pipeline)
    pipe.load_lora_weights(tmp_path / "full" / "final" / "lora")  # the line the script prints works


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*QUICK, "--steps", "4", "--cache-latents"]  # the latent cache, written by both ranks
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "diffusion_dpo.py", *common, "--per-device-batch", "2", "--output-dir", str(tmp_path / "ddp")]
    subprocess.run(ddp, check=True, cwd=REPO, env=env)
    single = [sys.executable, "diffusion_dpo.py", *common, "--per-device-batch", "4", "--output-dir", str(tmp_path / "one")]
    subprocess.run(single, check=True, cwd=REPO, env=env)
    w_ddp = load_file(tmp_path / "ddp" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    w_one = load_file(tmp_path / "one" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    w_0 = load_file(dd.toy_world().pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    rtol = float32_rtol(sum(v.numel() for v in w_0.values()))  # grad_norm sums over every weight: 1.2e-4 here
    for a, b in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "one"), strict=True):
        assert a == pytest.approx(b, rel=rtol, abs=1e-4)  # abs: see test_latent_cache_equals_encoding_every_step
    # Measured against how far training moved the weights: a few weights whose gradient is ~0 get a sign from the
    # all-reduce's summation order, and Adam turns that into a visible fraction of a step; everything else agrees.
    gap = torch.cat([(w_ddp[k] - w_one[k]).flatten() for k in w_one]).norm()
    moved = torch.cat([(w_one[k] - w_0[k]).flatten() for k in w_one]).norm()
    assert gap < 1e-3 * moved, (gap, moved)  # measured: 4e-5; a rank with the wrong data or noise gives ~1


def test_latent_cache_equals_encoding_every_step(tmp_path):
    run(tmp_path / "plain", "--steps", "3")
    run(tmp_path / "cached", "--steps", "3", "--cache-latents")
    # Batched differently, the VAE's float32 sums round differently; the rewards are β/2 = 2500 times an MSE gap,
    # so that rounding (~1e-8 of an MSE) shows as ~1e-5 in them.
    rtol = float32_rtol(dd.toy_world().resolution ** 2 * 3)  # the VAE's sums run over an image's pixels
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "cached"), strict=True):
        assert a == pytest.approx(b, rel=max(rtol, 1e-5), abs=1e-4)
    assert list((tmp_path / "cached" / "latent_cache").glob("latents-*.json"))


# ---------------------------------------------------------------- guard rails


def test_invalid_settings_are_rejected_with_the_flag_named(tmp_path):
    with pytest.raises(ValueError, match="--beta"):
        run(tmp_path / "a", "--beta", "0")
    with pytest.raises(ValueError, match="micro-batch"):
        run(tmp_path / "b", "--max-pairs", "6", "--per-device-batch", "8")
    rows = pq.read_table(dd.toy_world().pickapic / "train" / "part-0.parquet").slice(0, 8).drop(["label_1"])
    (tmp_path / "bad" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_batches(rows.to_batches()), tmp_path / "bad" / "train" / "part-0.parquet")
    with pytest.raises(ValueError, match="label_1"):
        run(tmp_path / "c", "--dataset-source", str(tmp_path / "bad"))


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = dd.diffusion_dpo_loss, itertools.count()

    def poisoned(*args, **kwargs):  # the third training step's loss is NaN
        loss, inside, m = real(*args, **kwargs)
        return (loss * float("nan") if next(calls) == 2 else loss), inside, m

    monkeypatch.setattr(dd, "diffusion_dpo_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 3.*checkpoints/step_0000002"):
        run(tmp_path, "--checkpoint-every", "1")
    step, weights, _ = load_checkpoint(tmp_path)
    assert step == 2 and all(torch.isfinite(v).all() for v in weights["unet"].values())


def test_latent_cache_is_keyed_by_the_pairs_content_not_the_path(tmp_path):
    """The data corrected in place (every label swapped, same path): the latent cache must not hand out the old
    winners. A shared --cache-dir gets a second cache under the new key; the default one in --output-dir is cleared
    by --overwrite. Before, both runs shared one cache keyed by the path, and pair 0's cached winner was the new
    loser."""
    data = tmp_path / "data"
    for split in ("train", "validation"):
        (data / split).mkdir(parents=True)
        (data / split / "part-0.parquet").write_bytes(
            (dd.toy_world().pickapic / split / "part-0.parquet").read_bytes())
    flags = ["--steps", "1", "--max-pairs", "16", "--eval-pairs", "4", "--cache-latents", "--dataset-source", str(data)]

    def latents(root: Path) -> dict[str, np.ndarray]:  # cache file -> (pairs, 2 [winner, loser], the rest)
        return {p.name: np.fromfile(p, dtype=np.float32).reshape(16, 2, -1) for p in root.glob("latents-*.bin")
                if p.with_suffix(".json").exists()}

    run(tmp_path / "shared", *flags, "--cache-dir", str(tmp_path / "cache"))
    run(tmp_path / "own", *flags)
    ((first, before),) = latents(tmp_path / "cache").items()
    table = pq.read_table(data / "train" / "part-0.parquet")
    label_0, label_1 = table.column("label_0"), table.column("label_1")
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", label_1)
    table = table.set_column(table.schema.get_field_index("label_1"), "label_1", label_0)
    pq.write_table(table, data / "train" / "part-0.parquet")  # corrected in place: the same path

    run(tmp_path / "shared", *flags, "--cache-dir", str(tmp_path / "cache"), "--overwrite")
    run(tmp_path / "own", *flags, "--overwrite")
    shared = latents(tmp_path / "cache")
    assert len(shared) == 2  # the first cache stays for its own key; the new key got its own
    (after,) = [v for name, v in shared.items() if name != first]
    np.testing.assert_array_equal(after[:, 0], before[:, 1])  # every cached winner is the old loser
    np.testing.assert_array_equal(after[:, 1], before[:, 0])
    (own,) = latents(tmp_path / "own" / "latent_cache").values()  # the old one was cleared by --overwrite
    np.testing.assert_array_equal(own, after)
