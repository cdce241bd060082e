"""The toy world: real classes and layouts, the toy reward against its formula, data consistent with the reward,
and a model whose samples follow their captions."""

import io
import json
import random
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from common import toy

REDUCED = dict(vae_steps=4, unet_steps=4, clip_steps=2, data_scale=0.02)  # seconds, not minutes


@pytest.fixture(scope="module")
def rebuilt_world(tmp_path_factory):
    """The builder on a reduced budget: the shipped world is used as is, so this is what keeps the builder honest."""
    root = tmp_path_factory.mktemp("rebuilt") / "world"
    toy.build(root, seed=1, **REDUCED)
    return toy.ToyWorld(root=root)


@pytest.fixture(params=["shipped", "rebuilt"])
def layout_world(request, world):
    """Layout and class checks run on the shipped world and on a freshly built one."""
    return world if request.param == "shipped" else request.getfixturevalue("rebuilt_world")


def test_pipeline_loads_with_the_real_classes_and_sd15_schedule(layout_world):
    world = layout_world
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(world.pipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    ddpm = DDPMScheduler.from_pretrained(world.pipeline, subfolder="scheduler")
    # SD1.5's scaled_linear schedule, computed independently: betas = linspace(sqrt(b0), sqrt(b1), 1000)^2.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(ddpm.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    assert ddpm.config.prediction_type == "epsilon" and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4


def test_tokenizer_needs_no_files_and_keeps_words_whole():
    tok = toy.make_tokenizer()
    for prompt in toy.PROMPTS:
        pieces = tok.tokenize(prompt)
        assert pieces == [w + "</w>" for w in prompt.split()]
    ids = tok(toy.PROMPTS[0], padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[len(toy.PROMPTS[0].split()) + 1] == tok.eos_token_id


def test_toy_reward_matches_its_formula_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g, requires_grad=True)
    prompts = [toy.PROMPTS[0], toy.PROMPTS[7], toy.PROMPTS[20]]
    r = toy.toy_reward(images, prompts)
    for i, p in enumerate(prompts):  # independent: an explicit loop over pixels in numpy
        c = np.array(toy.COLORS[p.split()[1]]) / 255.0
        x = images[i].detach().numpy()
        expect = np.mean([[np.exp(-np.sum((x[:, h, w] - c) ** 2) / (2 * 0.2**2)) for w in range(8)] for h in range(8)])
        assert r[i].item() == pytest.approx(expect, rel=1e-5)
    r.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_color_accuracy_counts_the_dominant_colour():
    rng = random.Random(0)
    prompts = ["a red circle on a white background", "a blue square on a black background"]
    right = toy.to_tensor([toy.draw(p, rng, size=8.0) for p in prompts])
    wrong = toy.to_tensor([toy.draw(prompts[0], rng, size=8.0, color="green"), toy.draw(prompts[1], rng, size=8.0)])
    assert toy.color_accuracy(right, prompts) == 1.0 and toy.color_accuracy(wrong, prompts) == 0.5


def test_reward_grows_with_the_shape_and_punishes_the_wrong_colour():
    prompt = "a red circle on a gray background"
    small = toy.draw(prompt, random.Random(0), size=4.0)
    big = toy.draw(prompt, random.Random(0), size=11.0)
    wrong = toy.draw(prompt, random.Random(0), size=11.0, color="blue")
    r = toy.toy_reward(toy.to_tensor([small, big, wrong]), [prompt] * 3)
    assert r[1] > r[0] > r[2]
    assert r[1] == pytest.approx(np.pi * 11**2 / 32**2, rel=0.25)  # about the covered fraction of the image
    with pytest.raises(ValueError, match="not a toy prompt"):
        toy.parse_prompt("a photo of a cat")


def test_pickapic_layout_and_labels_follow_the_reward(layout_world):
    world = layout_world
    table = pq.read_table(world.pickapic / "train" / "part-0.parquet").to_pylist()
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(table[0])
    ties = [r for r in table if r["label_0"] == 0.5]
    assert 0 < len(ties) < len(table) * 0.3
    for row in table[:100]:
        ims = [Image.open(io.BytesIO(row[k])).convert("RGB") for k in ("jpg_0", "jpg_1")]
        r0, r1 = toy.toy_reward(toy.to_tensor(ims), [row["caption"]] * 2).tolist()
        assert row["label_0"] + row["label_1"] == 1.0
        if row["label_0"] == 1.0:
            assert r0 > r1
        elif row["label_0"] == 0.0:
            assert r1 > r0


def test_imagereward_layout_ranks_follow_the_reward(layout_world):
    world = layout_world
    rows = pq.read_table(world.imagereward / "metadata-test.parquet").to_pylist()
    with zipfile.ZipFile(world.imagereward / "images" / "test" / "test_1.zip") as zf:
        names = set(zf.namelist())
        by_prompt: dict[str, list] = {}
        for row in rows:
            member = row["image_path"].removeprefix("images/test/")
            assert member in names
            im = Image.open(io.BytesIO(zf.read(member))).convert("RGB")
            by_prompt.setdefault(row["prompt_id"], []).append((row["rank"], toy.toy_reward(toy.to_tensor([im]), [row["prompt"]]).item()))
    for ranked in by_prompt.values():
        ranked.sort()
        assert ranked[0][0] == 1
        for (rank_a, r_a), (rank_b, r_b) in zip(ranked, ranked[1:]):
            assert rank_a <= rank_b and (rank_a == rank_b or r_a > r_b - 0.01)


def test_loaders_read_the_toy_layouts(layout_world):
    world = layout_world
    from common.data import load_binary, load_captioned_images, load_pairs, load_prompts

    pairs = load_pairs("pickapic", str(world.pickapic), "validation")
    assert 0 < len(pairs) < 200  # ties dropped
    scale = json.loads((world.root / "world.json").read_text()).get("data_scale", 1.0)
    # the reduced rebuild's barely trained model draws many images of equal rounded reward: tied pairs are dropped
    assert len(load_pairs("imagereward", str(world.imagereward), "validation")) > (40 if scale == 1.0 else 0)
    binary = load_binary(str(world.binary), "train")
    assert set(binary["label"]) == {0, 1}
    assert len(load_captioned_images(str(world.pretrain))) == max(8, int(1000 * scale))
    assert load_prompts(str(world.prompts)) == toy.PROMPTS


def test_samples_follow_their_captions(world):
    """The point of the toy model: its samples show the prompt's colour (chance would be 1 in 4)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world.pipeline)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(len(toy.PROMPTS))]
    images = pipe(toy.PROMPTS, num_inference_steps=20, guidance_scale=3.0, generator=gens, output_type="pt",
                  height=world.resolution, width=world.resolution).images
    assert toy.color_accuracy(images, toy.PROMPTS) >= 0.7
    # ... and vary in the attribute the reward measures
    r = toy.toy_reward(images, toy.PROMPTS)
    assert r.std() > 0.05


def test_world_is_cached_not_rebuilt(world):
    stamp = world.root / "world.json"
    before = stamp.stat().st_mtime_ns
    again = toy.toy_world(world.root)
    assert again.root == world.root and stamp.stat().st_mtime_ns == before


# The base model's mean toy reward on the fixed seeds every training script's toy evaluation uses (4 seeds per toy
# prompt, seed i for sample i, DDIM 20 steps, guidance 5), on the shipped world. The docs' toy tables start from this
# number; a drift of the world, the pipeline or diffusers' DDIM shows here first. Measured identical to 6 decimals
# with 1 and 2 threads on this project's machines; the tolerance leaves room for other CPUs' last bits only.
PINNED_BASE_REWARD = 0.162672


def test_base_model_toy_reward_is_pinned(world):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if world.root.name != "toy_world":
        pytest.skip("pinned on the shipped world only; $TOY_WORLD_DIR points elsewhere")
    pipe = StableDiffusionPipeline.from_pretrained(world.pipeline)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for _ in range(4) for p in toy.PROMPTS]
    images = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in range(len(prompts))],
                  num_inference_steps=20, guidance_scale=5.0, height=world.resolution, width=world.resolution,
                  output_type="pt").images
    assert toy.toy_reward(images, prompts).mean().item() == pytest.approx(PINNED_BASE_REWARD, abs=1e-4)


def test_rebuilt_world_has_the_full_layout(rebuilt_world):
    from common.data import load_captioned_images

    shipped = {p.relative_to(toy.DEFAULT_ROOT) for p in toy.DEFAULT_ROOT.rglob("*") if p.is_file()}
    rebuilt = {p.relative_to(rebuilt_world.root) for p in rebuilt_world.root.rglob("*") if p.is_file()}
    assert rebuilt == shipped  # the same files in the same places
    assert len(load_captioned_images(str(rebuilt_world.pretrain))) == 20


def test_prompt_sets_are_disjoint_balanced_and_match_their_files():
    """train / validation / test (the study's three sets) and heldout = validation + test (evaluate.py --toy)."""
    train, val, test = set(toy.TRAIN_PROMPTS), set(toy.VALIDATION_PROMPTS), set(toy.TEST_PROMPTS)
    assert not train & val and not train & test and not val & test and train | val | test == set(toy.PROMPTS)
    assert (len(train), len(val), len(test)) == (12, 6, 6) and val | test == set(toy.HELDOUT_PROMPTS)
    for side in (train, val | test):  # every colour, shape and background is seen on both sides of the split
        words = {w for p in side for w in toy.parse_prompt(p)}
        assert words == set(toy.COLORS) | set(toy.SHAPES) | set(toy.BACKGROUNDS)
    for side in (val, test):  # each: 3 circles and 3 squares, 2 prompts per background, every colour
        parsed = [toy.parse_prompt(p) for p in side]
        assert {c for c, _, _ in parsed} == set(toy.COLORS)
        assert sorted(s for _, s, _ in parsed).count("circle") == 3
        assert all([b for _, _, b in parsed].count(b) == 2 for b in toy.BACKGROUNDS)
    for split, prompts in (("train", toy.TRAIN_PROMPTS), ("heldout", toy.HELDOUT_PROMPTS),
                           ("validation", toy.VALIDATION_PROMPTS), ("test", toy.TEST_PROMPTS)):
        assert toy.PROMPT_FILES[split].read_text().splitlines() == prompts
