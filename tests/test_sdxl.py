"""Tests for SDXL in diffusion_dpo.py (common/models.py): text encoding and time_ids against
StableDiffusionXLPipeline's own, the family chosen from the config, turbo timesteps, the Adafactor settings, and the
script end to end on the toy SDXL pipeline (loss ln 2 at the start, held-out accuracy and toy reward rise, LoRA
resume exact, the LoRA loads into StableDiffusionXLPipeline).

    python -m pytest tests/test_sdxl.py
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import diffusion_dpo as dd
from common import models
from common.runtime import load_checkpoint
from common.toy import toy_sdxl_pipeline

CAPTIONS = ["a red circle on a white background", "a blue square on a black background", ""]
QUICK = ["--toy", "--toy-model", "sdxl", "--steps", "6", "--per-device-batch", "4", "--max-pairs", "64",
         "--log-every", "1", "--learning-rate", "1e-5", "--warmup-steps", "0", "--eval-pairs", "8", "--eval-draws", "1",
         "--num-validation-prompts", "0", "--reward-seeds", "0"]


@pytest.fixture(scope="session")
def sdxl(world):
    return toy_sdxl_pipeline()


def run(out: Path, *flags: str) -> dict:
    return dd.main(dd.parse_args([*QUICK, "--output-dir", str(out), *flags]))


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "charts/pairs_per_second"} for r in rows]


# ---------------------------------------------------------------- the SDXL pieces against the pipeline's own


def test_text_encoding_equals_the_pipelines_encode_prompt(sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    hidden, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    tokenizers, encoders = models.load_text_encoders(str(sdxl), models.SDXL, "cpu", torch.float32)
    with torch.no_grad():
        ours_hidden, ours_pooled = models.encode_text_sdxl(CAPTIONS, tokenizers, encoders)
    assert ours_hidden.shape == (3, 77, 64) and ours_pooled.shape == (3, 32)  # 32 + 32 features; 32 projected
    torch.testing.assert_close(ours_hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(ours_pooled, pooled, rtol=0, atol=0)
    # the training script's pair conditioning: rows i and B + i identical, a dropped caption encodes as ""
    text = dd.pair_embeddings(CAPTIONS[:2], torch.tensor([True, False]), tokenizers, encoders, {},
                              models.encode_text_sdxl)
    torch.testing.assert_close(text[0][:2], text[0][2:])
    torch.testing.assert_close(text[0][0], hidden[2])  # pair 0 dropped: the caption became ""
    torch.testing.assert_close(text[1][1], pooled[1])


def test_time_ids_equal_the_pipelines(sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    for resolution in (32, 512, 1024):
        expected = pipe._get_add_time_ids((resolution, resolution), (0, 0), (resolution, resolution), torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        torch.testing.assert_close(models.sdxl_time_ids(resolution)[None], expected)
    inputs = models.unet_inputs_sdxl((torch.zeros(2, 77, 64), torch.ones(2, 32)), 32)
    assert inputs["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    with torch.no_grad():  # the UNet takes them: its added embedding is 6 × 8 time features + 32 pooled
        out = pipe.unet(torch.zeros(2, 4, 8, 8), torch.tensor([1, 999]), **inputs).sample
    assert out.shape == (2, 4, 8, 8)


def test_family_is_chosen_from_the_unet_config(sdxl, world):
    assert models.model_family(str(sdxl)) is models.SDXL
    assert models.model_family(str(world.pipeline)) is models.SD15
    assert UNet2DConditionModel.load_config(sdxl, subfolder="unet")["addition_embed_type"] == "text_time"
    assert models.is_turbo("stabilityai/sdxl-turbo") and not models.is_turbo("stabilityai/stable-diffusion-xl-base-1.0")


def test_turbo_timesteps():
    t = torch.arange(1000)
    mapped = models.turbo_timesteps(t)
    assert mapped[:8].tolist() == [249, 499, 749, 999, 249, 499, 749, 999]  # 250·(t mod 4) + 249
    assert sorted(set(mapped.tolist())) == [249, 499, 749, 999]
    assert all((mapped == v).sum() == 250 for v in (249, 499, 749, 999))  # uniform over the four
    assert torch.equal(models.all_timesteps(t), t)


def test_turbo_schedule_has_zero_terminal_snr(sdxl):
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    scheduler = DDPMScheduler.from_pretrained(sdxl, subfolder="scheduler")
    ours = models.zero_terminal_snr(torch.cumprod(1 - scheduler.betas.double(), 0))
    expected = torch.cumprod(1 - rescale_zero_terminal_snr(scheduler.betas.double()), 0)  # diffusers' Lin et al. Alg. 1
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    assert ours[-1] == 0 and ours[0] == pytest.approx(1 - scheduler.betas[0].item(), rel=1e-6)  # ᾱ_0 kept


# ---------------------------------------------------------------- the script on the toy SDXL pipeline


def test_sdxl_defaults_adafactor_and_turbo(sdxl, tmp_path):
    run(tmp_path / "base", "--steps", "1", "--checkpoint-every", "1")
    args = json.loads((tmp_path / "base" / "args.json").read_text())
    assert (args["optimizer"], args["warmup_steps"], args["prompt_dropout"]) == ("adafactor", 0, 0.2)
    _, _, extra = load_checkpoint(tmp_path / "base")
    group = extra["optimizer"]["param_groups"][0]  # transformers.Adafactor with the official settings
    assert (group["clip_threshold"], group["scale_parameter"], group["relative_step"]) == (1.0, False, False)
    assert group["weight_decay"] == 1e-2 and group["lr"] == pytest.approx(1e-5 * 4)
    assert group["warmup_init"] is False and group["beta1"] is None

    turbo = tmp_path / "toy-sdxl-turbo"  # a turbo model is told by its name
    os.symlink(sdxl, turbo)
    run(tmp_path / "turbo", "--steps", "1", "--model", str(turbo), "--optimizer", "adamw")
    args = json.loads((tmp_path / "turbo" / "args.json").read_text())
    assert (args["optimizer"], args["prompt_dropout"], args["resolution"]) == ("adamw", 0.0, 32)


@pytest.mark.slow  # minutes of toy training: CI's second step (pytest.ini, README "Tests")
def test_toy_sdxl_run_aligns_the_model(sdxl, tmp_path):
    summary = dd.main(dd.parse_args(["--toy", "--toy-model", "sdxl", "--output-dir", str(tmp_path),
                                     "--num-validation-prompts", "0"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["losses/loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert summary["eval/implicit_acc"] > 0.5, summary
    assert summary["eval/reward_final"] > summary["eval/reward_base"] and summary["eval/reward_pvalue"] < 0.01, summary
    assert UNet2DConditionModel.load_config(tmp_path / "final" / "unet")["addition_embed_type"] == "text_time"


def test_resumed_sdxl_lora_run_equals_uninterrupted_and_loads(sdxl, tmp_path):
    run(tmp_path / "one", "--lora-rank", "4", "--checkpoint-every", "3")
    run(tmp_path / "two", "--lora-rank", "4", "--checkpoint-every", "3", "--stop-at-step", "3")
    run(tmp_path / "two", "--lora-rank", "4", "--checkpoint-every", "3", "--resume")
    assert metrics(tmp_path / "one") == metrics(tmp_path / "two")
    one = load_file(tmp_path / "one" / "final" / "lora" / "pytorch_lora_weights.safetensors")
    two = load_file(tmp_path / "two" / "final" / "lora" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    inputs = models.unet_inputs_sdxl((torch.randn(1, 77, 64), torch.randn(1, 32)), 32)
    with torch.no_grad():
        before = pipe.unet(x, t, **inputs).sample
        pipe.load_lora_weights(tmp_path / "one" / "final" / "lora")
        after = pipe.unet(x, t, **inputs).sample
    assert not torch.allclose(before, after, atol=1e-6)  # the adapters landed in the UNet


def test_toy_sdxl_samples_follow_captions_with_our_ddim_sampler(sdxl):
    """The toy SDXL world works, and ddim_sampler does not clip latents: DDIM's default clip_sample=True over SDXL's
    Euler config gives colour accuracy ~0.25 (chance) on this model."""
    from common.toy import PROMPTS, color_accuracy

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.scheduler = models.ddim_sampler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS, num_inference_steps=20, guidance_scale=5.0, output_type="pt", height=32, width=32,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]).images
    assert color_accuracy(images, PROMPTS) > 0.6  # measured 0.79, as the SD1.5 toy model


# ---------------------------------------------------------------- sft.py and evaluate.py on the toy SDXL pipeline


def test_sft_on_sdxl_lora_with_pretrain_regulariser_saves_a_loadable_lora(sdxl, tmp_path):
    """--data preferred with --reg pretrain puts both batches' SDXL conditioning (hidden states and pooled) through
    one UNet call; the LoRA loads with StableDiffusionXLPipeline.load_lora_weights and evaluate.py's loader."""
    import evaluate
    import sft

    out = tmp_path / "sft"
    sft.main(sft.parse_args(["--toy", "--toy-model", "sdxl", "--data", "preferred", "--reg", "pretrain",
                             "--lora-rank", "4", "--per-device-batch", "8", "--steps", "3", "--log-every", "1",
                             "--num-validation-prompts", "0", "--reward-seeds", "0", "--output-dir", str(out)]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["losses/reg"] > 0 for r in rows)
    assert json.loads((out / "args.json").read_text())["resolution"] == 32
    pipe = evaluate.load_pipeline(evaluate.resolve_model("sft", str(out), str(sdxl)), torch.float32,
                                  torch.device("cpu"))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    inputs = models.unet_inputs_sdxl((torch.randn(1, 77, 64), torch.randn(1, 32)), 32)
    with torch.no_grad():
        tuned = pipe.unet(x, t, **inputs).sample
        pipe.unet.disable_adapters()
        base = pipe.unet(x, t, **inputs).sample
    assert not torch.allclose(tuned, base, atol=1e-7)


@pytest.mark.slow  # minutes of toy training: CI's second step (pytest.ini, README "Tests")
def test_toy_reward_weighted_sft_on_sdxl_raises_reward(sdxl, tmp_path):
    import sft

    summary = sft.main(sft.parse_args(["--toy", "--toy-model", "sdxl", "--output-dir", str(tmp_path / "run"),
                                       "--generated-dir", str(tmp_path / "generated")]))
    assert summary["eval/reward_final"] > summary["eval/reward_base"] and summary["eval/reward_pvalue"] < 0.01, summary


def test_evaluate_toy_model_sdxl_samples_the_sdxl_pipeline(sdxl, tmp_path):
    """`evaluate.py --toy --toy-model sdxl`: the toy SDXL pipeline is the base, sampled through StableDiffusionXLPipeline
    with the toy evaluation's settings, and scored like any other model."""
    import evaluate

    args = evaluate.parse_args(["--toy", "--toy-model", "sdxl", "--candidates", f"same={sdxl}", "--max-prompts", "2",
                                "--images-per-prompt", "2", "--sample-steps", "3", "--scorers", "toy",
                                "--rating-pairs", "0", "--fid-reference", "None", "--n-resamples", "200",
                                "--output-dir", str(tmp_path / "ev")])
    assert Path(args.model).resolve() == Path(sdxl).resolve()
    assert isinstance(evaluate.load_pipeline(evaluate.Model("base", args.model), torch.float32, torch.device("cpu")),
                      StableDiffusionXLPipeline)
    evaluate.main(evaluate.check_args(args))
    runs = json.loads((tmp_path / "ev" / "results.json").read_text())["runs"]
    base, same = (np.array(runs[m]["per_image"]["toy"]) for m in ("base", "same"))
    assert base.shape == (2, 2) and np.allclose(base, same)  # the same pipeline, the same seeds: the same images
