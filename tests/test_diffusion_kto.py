"""Tests for diffusion_kto.py: the loss against an independent computation (values and gradient) and its closed form at
θ = ref, the reference point over the global batch, the split of comparisons into desirable and undesirable images,
the sampler's class mix and its resumability, and the script end to end on the toy world: the held-out true toy
reward rises, a run killed with kill -9 and resumed equals an uninterrupted one, 2 processes equal 1.

    python -m pytest tests/test_diffusion_kto.py
"""

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

import diffusion_kto as dk
from common.data import image_bytes
from common.toy import png_bytes
from test_hardening import assert_same_weights, kill_during_checkpoint

REPO = Path(__file__).resolve().parent.parent
# A few toy steps on a slice of the data, no sample grids or reward samples: the runs below take seconds. The learning
# rate is high enough that θ leaves the reference at once.
QUICK = ["--toy", "--steps", "6", "--per-device-batch", "8", "--max-images", "128", "--log-every", "1",
         "--learning-rate", "1e-4", "--warmup-steps", "0", "--eval-images", "16", "--eval-draws", "1",
         "--num-validation-prompts", "0", "--reward-seeds", "0"]


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same_rows(a: list[dict], b: list[dict], rel: float, abs: float, why: str = "") -> None:
    """Equal metrics.jsonl rows; a null (a class mean over a step with no image of that class) must be null in both."""
    assert [r["step"] for r in a] == [r["step"] for r in b], why
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert [k for k in x if x[k] is None] == [k for k in y if y[k] is None], (why, x["step"])
        assert {k: v for k, v in x.items() if v is not None} == pytest.approx(
            {k: v for k, v in y.items() if v is not None}, rel=rel, abs=abs), (why, x["step"])


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the one wall-clock metric."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "charts/images_per_second"} for r in rows]


# ---------------------------------------------------------------- the loss


def kto_by_hand(model_pred, ref_pred, target, desirable, beta, lam_d, lam_u):
    """The loss and its gradient with respect to model_pred, written out in numpy from the paper's equations:
    r = β(mse_ref − mse_θ), z = max(0, mean r) held fixed, loss = mean λ_y (1 − σ(s (r − z))), s = ±1;
    d loss / d model_pred_i = (1/B) λ_i σ'(a_i) s_i β · 2 (model_pred_i − ε_i) / (C·H·W), a_i = s_i (r_i − z)."""
    p, q, e = model_pred.numpy(), ref_pred.numpy(), target.numpy()
    B, D = len(p), p[0].size
    mse_m = ((p - e) ** 2).reshape(B, -1).mean(1)
    mse_r = ((q - e) ** 2).reshape(B, -1).mean(1)
    r = beta * (mse_r - mse_m)
    z = max(0.0, r.mean())
    s = np.where(desirable, 1.0, -1.0)
    lam = np.where(desirable, lam_d, lam_u)
    a = s * (r - z)
    sig = 1 / (1 + np.exp(-a))
    loss = np.mean(lam * (1 - sig))
    grad = (lam * sig * (1 - sig) * s * beta * 2 / D / B)[:, None, None, None] * (p - e)
    return loss, r, z, grad


@pytest.mark.parametrize("closer", [True, False], ids=["reference point > 0", "reference point clamped to 0"])
def test_loss_and_gradient_match_independent_formula(closer):
    B, beta, lam_d, lam_u = 6, 1000.0, 1.3, 0.7
    target = randn(B, 4, 8, 8, seed=0)
    ref_pred = target + 0.3 * randn(B, 4, 8, 8, seed=1)
    # θ a little closer to (or farther from) ε than the reference on average: the mean reward is > 0 (or < 0)
    shrink = 0.999 if closer else 1.001
    model_pred = (target + shrink * (ref_pred - target) + 0.002 * randn(B, 4, 8, 8, seed=2)).requires_grad_()
    desirable = torch.tensor([True, False, True, True, False, False])
    loss, reward, z, m = dk.diffusion_kto_loss(model_pred, ref_pred, target, desirable, beta, lam_d, lam_u)
    (grad,) = torch.autograd.grad(loss, model_pred)

    expected_loss, expected_r, expected_z, expected_grad = kto_by_hand(model_pred.detach(), ref_pred, target,
                                                                       desirable.numpy(), beta, lam_d, lam_u)
    assert (expected_z > 0) == closer  # the case the parameter names is the one computed
    np.testing.assert_allclose(reward.detach().numpy(), expected_r, rtol=1e-9)
    assert z.item() == pytest.approx(expected_z, abs=1e-12)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-9, atol=1e-15)  # z carries no gradient
    s = np.where(desirable.numpy(), 1, -1)
    assert m["correct"].item() == np.sum(s * (expected_r - expected_z) > 0)
    assert m["reward_desirable"].item() == pytest.approx(expected_r[desirable.numpy()].sum(), rel=1e-6)  # float32 log
    assert m["n_desirable"].item() == 3 and m["n"].item() == B


def test_loss_at_reference_is_half_the_weights_and_pulls_each_label_its_way():
    target, pred = randn(5, 4, 8, 8, seed=3), randn(5, 4, 8, 8, seed=4)
    desirable = torch.tensor([True, True, False, True, False])
    model_pred = pred.clone().requires_grad_()
    loss, reward, z, m = dk.diffusion_kto_loss(model_pred, pred, target, desirable, 1000.0, 2.0, 0.5)
    assert loss.item() == pytest.approx((2.0 * 3 + 0.5 * 2) / (2 * 5), abs=1e-15)  # mean λ_y σ(0) = mean λ_y / 2
    assert torch.equal(reward, torch.zeros(5, dtype=torch.float64)) and z.item() == 0.0
    assert m["correct"].item() == 0  # r − z = 0 is not > 0
    # A gradient step lowers the MSE of desirable images and raises that of undesirable ones
    (grad,) = torch.autograd.grad(loss, model_pred)
    step = model_pred.detach() - 1e-3 * grad
    mse = lambda p: ((p - target) ** 2).flatten(1).mean(1)  # noqa: E731
    moved = mse(step) - mse(pred)
    assert (moved[desirable] < 0).all() and (moved[~desirable] > 0).all()


def test_reference_point_is_the_batch_mean_given_and_clamped():
    target, ref_pred = randn(4, 4, 8, 8, seed=5), randn(4, 4, 8, 8, seed=6)
    model_pred = ref_pred + 0.01 * randn(4, 4, 8, 8, seed=7)
    desirable = torch.tensor([True, False, True, False])
    _, reward, z, _ = dk.diffusion_kto_loss(model_pred, ref_pred, target, desirable, 1000.0)
    assert z.item() == pytest.approx(max(0.0, reward.mean().item()), abs=1e-12)
    for other_gpus in (3.0, -3.0):  # DDP: the mean over every GPU's images, here another value than this batch's
        loss, _, z, _ = dk.diffusion_kto_loss(model_pred, ref_pred, target, desirable, 1000.0,
                                              batch_mean=lambda r: torch.as_tensor(other_gpus, dtype=r.dtype))
        assert z.item() == max(0.0, other_gpus)
        s = desirable.double() * 2 - 1
        assert loss.item() == pytest.approx((1 - torch.sigmoid(s * (reward - z))).mean().item(), rel=1e-12)


# ---------------------------------------------------------------- labelled images


def test_per_image_labels_split_comparisons_as_the_paper():
    # a beats b and c, b beats c, d beats e, f beats b: a, d, f only win; c, e only lose; b wins and loses
    keys_w, keys_l = ["a", "a", "b", "d", "f"], ["b", "c", "c", "e", "b"]
    for policy, b_label in (("desirable", True), ("undesirable", False), ("drop", None)):
        first, desirable = dk.per_image_labels(keys_w, keys_l, policy)
        keys = [[*keys_w, *keys_l][p] for p in first]
        labels = dict(zip(keys, desirable.tolist()))
        assert len(keys) == len(set(keys))  # one entry per image, wherever it appears
        expected = {"a": True, "d": True, "f": True, "c": False, "e": False}
        if b_label is not None:
            expected["b"] = b_label
        assert labels == expected, policy


def write_pickapic(folder: Path, rows: list[dict], with_uids: bool = True) -> None:
    for split in ("train", "validation"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows if with_uids else [{k: v for k, v in r.items() if "uid" not in k}
                                                             for r in rows])
        pq.write_table(table, folder / split / "part-0.parquet")


def test_pickapic_images_are_split_by_uid(tmp_path):
    img = {name: png_bytes(Image.new("RGB", (8, 8), c)) for name, c in zip("ABCDE", ["red", "green", "blue", "white",
                                                                                   "black"])}
    row = lambda a, b, label_0: dict(caption=f"{a} vs {b}", jpg_0=img[a], jpg_1=img[b], label_0=label_0,  # noqa: E731
                                     label_1=1.0 - label_0, image_0_uid=a, image_1_uid=b)
    # A beats B; C loses to B (B wins and loses: an intersection); D and E tie (dropped, as in the pairs)
    write_pickapic(tmp_path / "pap", [row("A", "B", 1.0), row("C", "B", 0.0), row("D", "E", 0.5)])
    for policy, expected in (("desirable", {"A": True, "B": True, "C": False}),
                             ("undesirable", {"A": True, "B": False, "C": False}),
                             ("drop", {"A": True, "C": False})):
        images = dk.load_labelled("pickapic", str(tmp_path / "pap"), "train", policy, None, 0.5)
        got = {next(k for k, v in img.items() if v == image_bytes(images.get(i)[1])): bool(images.desirable[i])
               for i in range(len(images))}
        assert got == expected, policy
    # a copy without uid columns: each pair side is its own image (B counted twice)
    write_pickapic(tmp_path / "nouid", [row("A", "B", 1.0), row("C", "B", 0.0), row("D", "E", 0.5)], with_uids=False)
    images = dk.load_labelled("pickapic", str(tmp_path / "nouid"), "train", "desirable", None, 0.5)
    assert len(images) == 4 and images.desirable.sum() == 2


def test_toy_data_as_labelled_images(world):
    labels = pq.read_table(world.pickapic / "train" / "part-0.parquet", columns=["label_0"]).column("label_0")
    decided = sum(label != 0.5 for label in labels.to_pylist())
    images = dk.load_labelled("pickapic", str(world.pickapic), "train", "desirable", None, 0.01)
    assert len(images) == 2 * decided and images.desirable.sum() == decided  # toy uids are unique: no intersections
    binary = pq.read_table(world.binary / "train.parquet", columns=["label"]).column("label").to_pylist()
    images = dk.load_labelled("binary", str(world.binary), "train", "desirable", None, 0.01)
    assert images.desirable.tolist() == [label == 1 for label in binary]
    # ImageRewardDB: with intersections undesirable, the desirable images are exactly each prompt's strict best
    rows = dk.load_imagereward(str(world.imagereward), "validation")
    images = dk.load_labelled("imagereward", str(world.imagereward), "validation", "undesirable", None, 0.01)
    best = {}
    for r in rows:
        best.setdefault(r["prompt_id"], []).append(r["rank"])
    n_best = sum(ranks.count(min(ranks)) for ranks in best.values() if len(set(ranks)) > 1)
    assert images.desirable.sum() == n_best


def test_sampler_mix_ranks_and_resume():
    desirable = np.array([True] * 30 + [False] * 70)
    take = lambda gen, n: list(itertools.islice(gen, n))  # noqa: E731
    single = take(dk.labelled_micro_batches(desirable, 8, 0, 1, seed=3, start=0, desirable_fraction=0.8), 300)
    drawn = np.array([desirable[i] for batch in single for _, i in batch])
    assert abs(drawn.mean() - 0.8) < 0.02  # 2400 draws: sd 0.008
    ranks = [take(dk.labelled_micro_batches(desirable, 4, r, 2, seed=3, start=0, desirable_fraction=0.8), 300)
             for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single  # 2 ranks × 4 images = the single process's 8
    resumed = take(dk.labelled_micro_batches(desirable, 8, 0, 1, seed=3, start=37, desirable_fraction=0.8), 5)
    assert resumed == single[37:42]  # a function of the micro-step alone
    assert len({d for batch in single for d, _ in batch}) == 2400  # every draw its own flip key
    epochs = take(dk.labelled_micro_batches(desirable, 10, 0, 1, seed=3, start=0, desirable_fraction=None), 10)
    assert sorted(i for batch in epochs for _, i in batch) == list(range(100))  # natural mix: one epoch


# ---------------------------------------------------------------- the script end to end


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`python diffusion_kto.py --toy` as documented, once for this module."""
    out = tmp_path_factory.mktemp("kto") / "run"
    subprocess.run([sys.executable, str(REPO / "diffusion_kto.py"), "--toy", "--output-dir", str(out)], check=True,
                   cwd=REPO)
    return out


@pytest.mark.slow  # minutes of toy training: CI's second step (pytest.ini, README "Tests")
def test_toy_run_raises_the_true_toy_reward(toy_run, world):
    out = toy_run
    result = json.loads((out / "eval.json").read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "reward_prompts"}, indent=2))
    assert result["eval/reward_final"] > result["eval/reward_base"]  # the toy reward the labels came from
    assert result["eval/reward_pvalue"] < 0.01
    assert result["eval/auc"] > 0.6  # held-out liked images get a higher implicit reward; chance 0.5
    assert "warning" not in result
    labels = pq.read_table(world.pickapic / "train" / "part-0.parquet", columns=["label_0"]).column("label_0")
    decided = sum(label != 0.5 for label in labels.to_pylist())
    assert result["train_images"] == 2 * decided and result["train_desirable"] == decided

    rows = [r for r in metrics(out) if "losses/loss" in r]
    assert rows[0]["step"] == 1 and rows[0]["losses/loss"] == pytest.approx(0.5, abs=1e-6)  # θ = ref: λ/2
    assert rows[0]["losses/implicit_acc"] == 0.0 and rows[0]["rewards/reference_point"] == 0.0
    late = [r for r in rows if r["step"] > rows[-1]["step"] // 2]
    assert np.mean([r["rewards/desirable"] - r["rewards/undesirable"] for r in late]) > 0
    assert 0.7 < np.mean([r["charts/desirable_fraction"] for r in rows]) < 0.9  # --desirable-fraction 0.8

    unet = UNet2DConditionModel.from_pretrained(out / "final" / "unet")  # diffusers format, loads elsewhere
    base = UNet2DConditionModel.from_pretrained(world.pipeline, subfolder="unet")
    assert not torch.equal(unet.conv_out.weight, base.conv_out.weight)
    assert (out / "samples" / "step_0000000.png").exists() and (out / "checkpoints" / "latest").exists()
    assert json.loads((out / "args.json").read_text())["beta"] == 1000.0


def test_kill9_lora_run_resumes_to_the_uninterrupted_result(tmp_path):
    flags = [*QUICK, "--lora-rank", "4", "--checkpoint-every", "1"]
    whole, cut, kill_at = tmp_path / "whole", tmp_path / "cut", random.randint(2, 5)
    dk.main(dk.parse_args([*flags, "--output-dir", str(whole)]))
    kill_during_checkpoint("diffusion_kto.py", kill_at, [*flags, "--output-dir", str(cut)], cut)  # test_hardening's
    dk.main(dk.parse_args([*flags, "--output-dir", str(cut), "--resume"]))
    a, b = metrics(whole), metrics(cut)
    assert a[0]["losses/loss"] == pytest.approx(0.5, abs=1e-6)  # LoRA starts at the reference (lora_B = 0)
    assert_same_rows(a, b, rel=1e-6, abs=1e-9, why=f"killed at step {kill_at}")
    assert json.loads((cut / "eval.json").read_text()) == json.loads((whole / "eval.json").read_text())
    lora = Path("final/lora/pytorch_lora_weights.safetensors")
    assert_same_weights(whole / lora, cut / lora)


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*QUICK, "--steps", "3"]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "diffusion_kto.py", *common, "--per-device-batch", "4", "--output-dir", str(tmp_path / "ddp")]
    subprocess.run(ddp, check=True, cwd=REPO, env=env)
    single = [sys.executable, "diffusion_kto.py", *common, "--output-dir", str(tmp_path / "one")]
    subprocess.run(single, check=True, cwd=REPO, env=env)
    # the reference point is the mean over BOTH ranks' images: a rank-local one would differ here
    w_0 = load_file(dk.toy_world().pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    rtol = math.sqrt(sum(v.numel() for v in w_0.values())) * torch.finfo(torch.float32).eps  # as test_diffusion_dpo
    assert_same_rows(metrics(tmp_path / "ddp"), metrics(tmp_path / "one"), rel=rtol, abs=1e-4)
    w_ddp = load_file(tmp_path / "ddp" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    w_one = load_file(tmp_path / "one" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    gap = torch.cat([(w_ddp[k] - w_one[k]).flatten() for k in w_one]).norm()
    moved = torch.cat([(w_one[k] - w_0[k]).flatten() for k in w_one]).norm()
    assert gap < 1e-3 * moved, (gap, moved)


# ---------------------------------------------------------------- guard rails


def test_invalid_settings_are_rejected_with_the_flag_named(tmp_path):
    with pytest.raises(ValueError, match="--beta"):
        dk.main(dk.parse_args([*QUICK, "--beta", "0", "--output-dir", str(tmp_path / "a")]))
    with pytest.raises(ValueError, match="--desirable-fraction"):
        dk.main(dk.parse_args([*QUICK, "--desirable-fraction", "1.0", "--output-dir", str(tmp_path / "b")]))
    with pytest.raises(ValueError, match="--dataset-source"):
        dk.main(dk.parse_args(["--dataset", "binary", "--output-dir", str(tmp_path / "c")]))


def test_toy_sdxl_lora_run_starts_at_the_reference_and_saves_a_loadable_lora(tmp_path):
    """SDXL through common/models.py (text encoders, added conditioning, pipeline class), as diffusion_dpo.py."""
    out = tmp_path / "sdxl"
    result = dk.main(dk.parse_args([*QUICK, "--toy-model", "sdxl", "--lora-rank", "4", "--steps", "2",
                                    "--per-device-batch", "4", "--output-dir", str(out)]))
    assert result["steps"] == 2 and "eval/auc" in result
    assert metrics(out)[0]["losses/loss"] == pytest.approx(0.5, abs=1e-6)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(dk.toy_sdxl_pipeline())
    pipe.load_lora_weights(out / "final" / "lora")  # the line the script prints works
