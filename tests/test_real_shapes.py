"""The scripts at the real shapes: randomly initialised SD1.5 and SDXL pipelines built from the published configs
(benchmarks/real_shapes.py), data in the real layouts with 512 px JPEGs.

Quick tests (in the default `pytest`): the shipped configs give the published parameter counts, the stand-in CLIP
tokenizer has CLIP's id layout, the real-layout data loads through common/data.py.

Slow tests (marked `real_shapes`, deselected by pytest.ini; `.ci/run` runs them as a second step, one at a time
because of memory): each training script (diffusion_dpo.py, sft.py, diffusion_kto.py, dpok.py, grpo.py, draft.py
--method alignprop) with LoRA on the real-shape SD1.5 is started, SIGKILLed after its first checkpoint, resumed,
finished; its printed load line loads the result and generates an image; first-step values known exactly are
checked. The online methods score with a tiny random CLIP: the diffusion model is what is real here. The GPU
command's dry run (benchmarks/gpu.py --dry-run). SDXL at its real shape takes a Diffusion-DPO step with LoRA and gradient
checkpointing (on a GPU, or on a CPU with REAL_SHAPES_SDXL=1). Each run's peak memory (peak RSS of the process on a
CPU) is printed in the test log's PEAK MEMORY section (tests/conftest.py). The resolution is 512 px where a GPU is present; on a CPU 128 px
(`REAL_SHAPES_RESOLUTION` overrides): a LoRA step at 512 px needs 10 GiB and minutes on 2 CPU cores, too slow for
CI (README, "Real shapes").

    python -m pytest tests/test_real_shapes.py -m real_shapes -n 0
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import real_shapes

REPO = Path(__file__).resolve().parent.parent
RES = int(os.environ.get("REAL_SHAPES_RESOLUTION", 512 if torch.cuda.is_available() else 128))


# ---------------------------------------------------------------- quick: configs, tokenizer, data
def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_shipped_configs_give_the_published_parameter_counts():
    """Built on the meta device (no memory): the counts the model cards and papers give for these models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = lambda name, sub, f="config.json": json.loads((real_shapes.CONFIGS / name / sub / f).read_text())  # noqa
    with torch.device("meta"):
        assert _count(UNet2DConditionModel.from_config(cfg("sd15", "unet"))) == 859_520_964
        assert _count(AutoencoderKL.from_config(cfg("sd15", "vae"))) == 83_653_863
        assert _count(CLIPTextModel(CLIPTextConfig(**cfg("sd15", "text_encoder")))) == 123_060_480
        assert _count(UNet2DConditionModel.from_config(cfg("sdxl", "unet"))) == 2_567_463_684
        assert _count(CLIPTextModelWithProjection(CLIPTextConfig(**cfg("sdxl", "text_encoder_2")))) == 694_659_840
    assert cfg("sd15", "vae")["scaling_factor"] == 0.18215 and cfg("sdxl", "vae")["scaling_factor"] == 0.13025


def test_stand_in_tokenizer_has_clips_id_layout():
    tok = real_shapes.clip_tokenizer()
    ids = tok(["a photograph of an astronaut riding a horse", ""], padding="max_length", max_length=77,
              truncation=True).input_ids
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert all(len(row) == 77 for row in ids)
    assert ids[0][0] == 49406 and max(ids[0]) == 49407  # BOS first; EOS the largest id (CLIP's pooled output)
    assert ids[1][:3] == [49406, 49407, 49407]  # "" is BOS, EOS, then EOS padding (SD1.5's pad token)
    long = tok(["word " * 200], truncation=True, max_length=77).input_ids[0]
    assert len(long) == 77 and long[-1] == 49407
    assert real_shapes.clip_tokenizer(pad_token="!").pad_token_id == 0  # SDXL's tokenizer_2


def test_real_layout_data_loads_through_the_scripts_loaders(tmp_path):
    from common.data import decode_image, load_pairs

    real_shapes.pickapic(tmp_path / "pickapic", n=4)
    real_shapes.imagereward(tmp_path / "imagereward", prompts=3, images=3)
    pairs = load_pairs("pickapic", str(tmp_path / "pickapic"), "train")
    assert len(pairs) == 3  # 4 rows, the tie dropped
    sizes = {decode_image(im).size for p in pairs for im in (p.image_w, p.image_l)}
    assert sizes == {(512, 512), (768, 512)}
    pairs = load_pairs("imagereward", str(tmp_path / "imagereward"), "train")
    assert len(pairs) == 3 * 2  # per prompt 3 images, ranks 1, 2, 2: the two pairs with different ranks
    assert {decode_image(im).size for p in pairs for im in (p.image_w, p.image_l)} == {(512, 512)}


@pytest.mark.real_shapes
def test_gpu_command_dry_run(tmp_path):
    """benchmarks/gpu.py --dry-run: every row's code path at a tiny size on the CPU, so a typo does not cost GPU time.
    Every row is either measured or skipped with its reason, and the results file names the device."""
    out = tmp_path / "results_gpu.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "Device:" in text and "dry run" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 9
    failed = [r for r in rows if "failed" in r]
    assert not failed, failed
    for r in rows:
        assert "skipped:" in r or any(ch.isdigit() for ch in r.split("|")[2]), r


# ---------------------------------------------------------------- slow: the scripts at the real shapes
def run(cmd: list[str], kill_when: Path | None = None) -> tuple[int, str, float]:
    return real_shapes.run_measured(cmd, REPO, kill_when)


@pytest.fixture(scope="module")
def real(tmp_path_factory, real_sd15):
    root = tmp_path_factory.mktemp("real")
    (root / "sd15").symlink_to(real_sd15, target_is_directory=True)  # conftest's one build per session (4.3 GB)
    real_shapes.pickapic(root / "pickapic", n=6)
    real_shapes.imagereward(root / "imagereward", prompts=2, images=3)
    real_shapes.clip_scorer(root / "clip_tiny", kind="tiny")  # the online methods' reward: the UNet is what is real here
    (root / "prompts.txt").write_text(real_shapes.CAPTIONS[2] + "\n")
    return root


@pytest.mark.real_shapes
def test_diffusion_dpo_sd15_lora_kill_resume_load_generate(real, peak_memory):
    """Pick-a-Pic pairs at 512 px resized to RES; at step 1 θ = ref (LoRA B = 0), so the loss is −log σ(0) = log 2."""
    rows = kill_resume_load_generate(peak_memory, f"diffusion_dpo.py SD1.5 LoRA {RES} px", [
        sys.executable, "diffusion_dpo.py", "--model", str(real / "sd15"), "--dataset-source", str(real / "pickapic"),
        "--resolution", str(RES), "--lora-rank", "4", "--steps", "2", "--grad-accum", "1", "--per-device-batch", "1",
        "--num-workers", "0", "--warmup-steps", "0", "--log-every", "1", "--checkpoint-every", "1",
        "--num-validation-prompts", "0", "--eval-pairs", "1", "--mixed-precision", PRECISION], real / "run_dpo")
    assert abs(rows[1]["losses/loss"] - math.log(2)) < 1e-3


# ---------------------------------------------------------------- every training script, the same cycle
PRECISION = "bf16" if torch.cuda.is_available() else "no"
RATIO_TOL = 1e-2 if torch.cuda.is_available() else 1e-3  # ρ recomputed in another batch layout: rounding only


def training_rows(out: Path) -> dict[int, dict]:
    """metrics.jsonl's training rows (those with losses/loss) by step."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "losses/loss" in r}


def kill_resume_load_generate(peak_memory, name: str, cmd: list[str], out: Path) -> dict[int, dict]:
    """The real-shape cycle of a training script run for 2 optimizer steps with a checkpoint every step: SIGKILLed
    once its first checkpoint exists, resumed, finished; the load line it printed loads the result, which generates
    one RES x RES image. Each process's peak RSS is reported. Returns the training rows of metrics.jsonl by step."""
    code, log, peak = run([*cmd, "--output-dir", str(out), "--overwrite"], kill_when=out / "checkpoints" / "latest")
    assert code == -signal.SIGKILL, log[-3000:]  # killed, not finished before the kill landed
    peak_memory(f"{name} (killed run)", peak)
    before = training_rows(out)
    assert 1 in before and 2 not in before, sorted(before)
    code, log, peak = run([*cmd, "--output-dir", str(out), "--resume"])
    assert code == 0, log[-3000:]
    peak_memory(f"{name} (resumed run)", peak)
    rows = training_rows(out)
    assert sorted(rows) == [1, 2]
    assert rows[1] == before[1]  # step 1 from the killed run, step 2 from the resumed one (not a restart)
    assert (out / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    printed = re.search(r"load (?:the result )?with:\n\s*(.+)", log)
    assert printed, log[-3000:]
    load = printed.group(1).strip()
    assert str((out / "final" / "lora").resolve()) in load  # the result of this run, not another
    image = out / "generated.png"
    code, log, peak = run([sys.executable, "-c", f"{load}; pipe.set_progress_bar_config(disable=True); "
                           f"pipe('a cat wearing a tiny wizard hat', num_inference_steps=1, height={RES}, "
                           f"width={RES}).images[0].save({str(image)!r})"])
    assert code == 0, log[-3000:]
    peak_memory(f"{name}: the printed load line + one {RES} px image", peak)
    from PIL import Image

    assert Image.open(image).size == (RES, RES)
    return rows


@pytest.mark.real_shapes
def test_sft_preferred_sd15_lora_kill_resume_load_generate(real, peak_memory):
    """Diffusion-DPO's SFT baseline on the winners of the real-layout ImageRewardDB (zipped WebP images), with DPOK's
    KL regulariser: at step 1 the LoRA's B = 0, so ε_θ = ε_pre exactly and the regulariser is 0."""
    rows = kill_resume_load_generate(peak_memory, f"sft.py --data preferred SD1.5 LoRA {RES} px", [
        sys.executable, "sft.py", "--data", "preferred", "--dataset", "imagereward", "--dataset-source",
        str(real / "imagereward"), "--scorer", "none", "--model", str(real / "sd15"), "--resolution", str(RES),
        "--lora-rank", "4", "--reg", "kl", "--steps", "2", "--per-device-batch", "1", "--grad-accum", "1",
        "--num-workers", "0", "--warmup-steps", "0", "--log-every", "1", "--checkpoint-every", "1",
        "--num-validation-prompts", "0", "--mixed-precision", PRECISION], real / "run_sft")
    assert rows[1]["losses/reg"] == 0.0
    assert rows[1]["losses/loss"] == pytest.approx(rows[1]["losses/mse"], rel=1e-6)  # w = 1, R = 0
    assert rows[1]["charts/grad_norm"] > 0


@pytest.mark.real_shapes
def test_diffusion_kto_sd15_lora_kill_resume_load_generate(real, peak_memory):
    """Pick-a-Pic pairs split into liked and disliked images. At step 1 θ = ref (LoRA B = 0): every implicit reward
    is 0, so is the reference point, and the loss is λ_y·(1 − σ(0)) = 0.5 at λ_D = λ_U = 1."""
    rows = kill_resume_load_generate(peak_memory, f"diffusion_kto.py SD1.5 LoRA {RES} px", [
        sys.executable, "diffusion_kto.py", "--model", str(real / "sd15"), "--dataset", "pickapic",
        "--dataset-source", str(real / "pickapic"), "--resolution", str(RES), "--lora-rank", "4", "--steps", "2",
        "--per-device-batch", "1", "--grad-accum", "1", "--num-workers", "0", "--warmup-steps", "0",
        "--log-every", "1", "--checkpoint-every", "1", "--num-validation-prompts", "0", "--eval-images", "2",
        "--mixed-precision", PRECISION], real / "run_kto")
    assert rows[1]["losses/loss"] == pytest.approx(0.5, abs=1e-6)
    assert rows[1]["rewards/mean"] == 0.0 and rows[1]["rewards/reference_point"] == 0.0
    assert rows[1]["charts/grad_norm"] > 0  # ∂L/∂r = ∓λ·σ'(0) at r = 0: the LoRA is pushed even at θ = ref


@pytest.mark.real_shapes
def test_dpok_sd15_lora_kill_resume_load_generate(real, peak_memory):
    """One prompt, one trajectory of one DDIM step per iteration, a buffer of exactly that transition, one policy
    step on it: ρ = 1 (θ = θ_old), and at step 1 the KL to the base is 0 (LoRA B = 0)."""
    rows = kill_resume_load_generate(peak_memory, f"dpok.py SD1.5 LoRA {RES} px", [
        sys.executable, "dpok.py", "--model", str(real / "sd15"), "--resolution", str(RES),
        "--prompt", real_shapes.CAPTIONS[2], "--scorer", "pickscore", "--scorer-path", str(real / "clip_tiny"),
        "--clip-path", str(real / "clip_tiny"),
        "--lora-rank", "4", "--rollout-steps", "1", "--sample-batch", "1", "--buffer-size", "1", "--policy-steps", "1",
        "--policy-batch", "1", "--grad-accum", "1", "--value-steps", "1", "--value-batch", "1", "--steps", "2",
        "--checkpoint-every", "1", "--sample-every", "2", "--num-validation-prompts", "1", "--reward-scale", "none",
        "--sample-steps", "1", "--mixed-precision", PRECISION], real / "run_dpok")
    assert rows[1]["losses/kl"] == 0.0
    for step in (1, 2):
        assert abs(rows[step]["charts/ratio"] - 1) < RATIO_TOL, rows[step]
        assert rows[step]["charts/grad_norm"] > 0  # the advantage r − V is not 0: the LoRA gets a gradient


@pytest.mark.real_shapes
def test_grpo_sd15_lora_kill_resume_load_generate(real, peak_memory):
    """One prompt, a group of 2 trajectories of 2 DDIM steps, one optimizer step per iteration: ρ = 1 before the
    update (charts/first_ratio, DanceGRPO's own check), and the group's advantages are ±1/√2, so the policy loss
    mean(−A·ρ) is 0."""
    rows = kill_resume_load_generate(peak_memory, f"grpo.py SD1.5 LoRA {RES} px", [
        sys.executable, "grpo.py", "--model", str(real / "sd15"), "--resolution", str(RES),
        "--prompts", str(real / "prompts.txt"), "--scorer", "pickscore", "--scorer-path", str(real / "clip_tiny"),
        "--clip-path", str(real / "clip_tiny"),
        "--lora-rank", "4", "--group-size", "2", "--sample-batch", "1", "--rollout-steps", "2",
        "--per-device-batch", "2", "--grad-accum", "1", "--steps", "2", "--checkpoint-every", "1",
        "--sample-every", "2", "--num-validation-prompts", "1", "--sample-steps", "1",
        "--mixed-precision", PRECISION], real / "run_grpo")
    for step in (1, 2):
        assert rows[step]["rewards/group_std"] > 0 and rows[step]["charts/grad_norm"] > 0  # a group that teaches
        assert abs(rows[step]["charts/first_ratio"] - 1) < RATIO_TOL, rows[step]
        assert abs(rows[step]["losses/policy_loss"]) < RATIO_TOL, rows[step]


@pytest.mark.real_shapes
def test_alignprop_sd15_lora_kill_resume_load_generate(real, peak_memory):
    """draft.py --method alignprop: the reward's gradient through the last K ~ U{1, 2} of 2 DDIM steps and the
    VAE decoder (K drawn from the RNG stream the checkpoint restores); loss = λ·(−r), λ = 0.01."""
    rows = kill_resume_load_generate(peak_memory, f"draft.py --method alignprop SD1.5 LoRA {RES} px", [
        sys.executable, "draft.py", "--method", "alignprop", "--model", str(real / "sd15"), "--resolution", str(RES),
        "--prompts", str(real / "prompts.txt"), "--scorer", "clip-raw", "--scorer-path", str(real / "clip_tiny"),
        "--clip-score-model", str(real / "clip_tiny"), "--lora-rank", "4", "--rollout-steps", "2",
        "--random-backprop", "1", "2", "--per-device-batch", "1", "--grad-accum", "1", "--steps", "2",
        "--checkpoint-every", "1", "--sample-every", "2", "--num-validation-prompts", "1", "--sample-steps", "1",
        "--mixed-precision", PRECISION], real / "run_alignprop")
    for step in (1, 2):
        assert rows[step]["charts/window_steps"] in (1, 2) and rows[step]["charts/grad_norm"] > 0
        assert rows[step]["losses/loss"] == pytest.approx(-0.01 * rows[step]["rewards/mean"], rel=1e-5)


@pytest.mark.real_shapes
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("REAL_SHAPES_SDXL")),
                    reason="SDXL at its real shape (128 px, one step) needs 12.6 GiB and over 10 minutes on 2 CPU "
                           "cores: on a CPU only with REAL_SHAPES_SDXL=1")
def test_diffusion_dpo_sdxl_lora_checkpointing_step(tmp_path, peak_memory):
    res = int(os.environ.get("REAL_SHAPES_SDXL_RESOLUTION", 1024 if torch.cuda.is_available() else 128))
    real_shapes.pipeline("sdxl", tmp_path / "sdxl")
    real_shapes.pickapic(tmp_path / "pickapic", n=3, size=1024)
    out = tmp_path / "run"
    code, log, peak = run([sys.executable, "diffusion_dpo.py", "--model", str(tmp_path / "sdxl"), "--dataset-source",
                           str(tmp_path / "pickapic"), "--resolution", str(res), "--lora-rank", "4", "--steps", "1",
                           "--grad-accum", "1", "--per-device-batch", "1", "--num-workers", "0", "--warmup-steps", "0",
                           "--log-every", "1", "--gradient-checkpointing", "--num-validation-prompts", "0",
                           "--eval-pairs", "1", "--mixed-precision",
                           "no" if not torch.cuda.is_available() else "bf16", "--output-dir", str(out)])
    assert code == 0, log[-3000:]
    peak_memory(f"diffusion_dpo.py SDXL LoRA + gradient checkpointing {res} px", peak)
    assert "StableDiffusionXLPipeline" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("step") == 1 and "losses/loss" in r)
    assert abs(first["losses/loss"] - math.log(2)) < 1e-3
    assert (out / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
