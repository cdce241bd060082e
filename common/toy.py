"""The offline toy world: a tiny Stable-Diffusion-1.5-shaped model and data in the real datasets' layouts.

Our users run the real thing (SD1.5, Pick-a-Pic v2, ImageRewardDB) on GPUs. Our CI has neither a GPU nor the
Hugging Face hub, and a newcomer wants to watch a method work in two minutes first. So every script takes `--toy`
and runs its *real* code path on this world: the same diffusers/transformers classes loaded with the same
`from_pretrained(path)` calls, the same dataset layouts read by the same loaders, only smaller.

The world ships with the project, in `toy_world/` (about 11 MB, versioned in git): a fresh clone trains at once,
and every machine starts from the same bytes, so the toy figures in the docs come back. `$TOY_WORLD_DIR` points
elsewhere. The builder stays: `python -m common.toy --rebuild` rebuilds it from its seed (about five minutes on 2
idle CPU cores; the result differs in the last bits between CPUs and thread counts, which is why we ship it), and
`toy_world()` builds a missing world on first use.

    pipeline/      StableDiffusionPipeline folder: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer
                   (a vocabulary of our own, no downloaded files), DDIMScheduler with SD1.5's schedule
                   (scaled_linear, beta 0.00085 -> 0.012, 1000 steps, epsilon prediction). 32 px images, 4x8x8 latents.
    clip/          a tiny CLIPModel + CLIPProcessor (image and text towers), briefly trained contrastively on the toy
                   images, for the reward-model and CLIP-score code paths.
    pickapic/      Pick-a-Pic v2 layout: {train,validation,test}/part-0.parquet with caption, jpg_0, jpg_1 (encoded
                   bytes), label_0, label_1 (1/0, 0/1 or 0.5/0.5 for a tie), image_0_uid, image_1_uid, ...
    imagereward/   ImageRewardDB layout: metadata-{split}.parquet (image_path, prompt_id, prompt, rank: 1 is best,
                   ties allowed) and images/{split}/{split}_1.zip with members {split}_1/<id>.png. As in the real
                   one, the images are samples of the model itself (several sampler settings), not drawings.
    binary/        Lee et al. 2023 layout: {train,validation}.parquet with prompt, image (bytes), label (1 good, 0 bad).
    pretrain.parquet   unlabelled image-caption pairs (caption, image bytes), for SFT's pre-training regulariser.
    prompts.txt    the toy prompt set, one per line.

The images are coloured shapes on plain backgrounds, captioned "a red circle on a white background". The model
learns to follow the caption; the size of the shape is left free, so samples vary in it, and the toy reward
(`toy_reward`) measures it: the fraction of the image painted in the prompt's object colour. "Humans" in the toy
preference data prefer the image with the higher toy reward, so a method that aligns the model to them makes the
shapes bigger while keeping colours and shapes right, which is what the tests measure.

Run `python -m common.toy` to draw a grid of captioned samples of the base model (docs/toy_samples.png), and
`python -m common.toy --rebuild` to build the world anew first.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

VERSION = "3"  # bump when the world changes, so stale caches are rebuilt
RESOLUTION = 32
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "toy_world"  # shipped with the project

# The toy vocabulary. Object colours never equal background colours, so the reward is unambiguous.
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128)}
SHAPES = ("circle", "square")
PROMPTS = [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in BACKGROUNDS]
# The held-out split (evaluate.py --toy): half of the prompts, every colour, shape and background on both sides, chosen
# by the parity of (colour, shape, background) indices. The study (benchmarks/study.py, docs/study.md's protocol)
# splits the held-out half again, into VALIDATION_PROMPTS (any tuning, recipe choice or stopping rule looks only
# there) and TEST_PROMPTS (the report, touched once), so the three sets are disjoint: its arms train on TRAIN_PROMPTS
# only, as a real study trains on ImageRewardDB's prompts and reports on PartiPrompts. The held-out split was fixed
# before any result, for balance alone: each of the two holds 3 circles and 3 squares, 2 prompts of each background
# and every colour. The lists are also tracked as text files, common/toy_prompts_{split}.txt, so they can be passed as
# --prompts (tests/test_toy.py keeps them equal).
HELDOUT_PROMPTS = [f"a {c} {s} on a {b} background" for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES)
                   for k, b in enumerate(BACKGROUNDS) if (i + j + k) % 2 == 1]
TRAIN_PROMPTS = [p for p in PROMPTS if p not in HELDOUT_PROMPTS]
TEST_PROMPTS = [f"a {p} background" for p in ("red circle on a black", "red square on a gray", "green circle on a white",
                                               "green square on a black", "blue square on a white",
                                               "yellow circle on a gray")]
VALIDATION_PROMPTS = [p for p in HELDOUT_PROMPTS if p not in TEST_PROMPTS]
PROMPT_FILES = {split: Path(__file__).resolve().parent / f"toy_prompts_{split}.txt"
                for split in ("train", "heldout", "validation", "test")}


@dataclass(frozen=True)
class ToyWorld:
    root: Path

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    @property
    def clip(self) -> Path:
        return self.root / "clip"

    @property
    def pickapic(self) -> Path:
        return self.root / "pickapic"

    @property
    def imagereward(self) -> Path:
        return self.root / "imagereward"

    @property
    def binary(self) -> Path:
        return self.root / "binary"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain.parquet"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.txt"

    resolution: int = RESOLUTION


# ----------------------------------------------------------------------------------------------------------------
# The toy reward: computed from pixels and prompt, differentiable with respect to the pixels.
# ----------------------------------------------------------------------------------------------------------------
def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """'a red circle on a white background' -> ('red', 'circle', 'white'). Raises ValueError on other prompts."""
    words = prompt.lower().split()
    try:
        color, shape, background = words[1], words[2], words[5]
    except IndexError:
        color = shape = background = ""
    if color not in COLORS or shape not in SHAPES or background not in BACKGROUNDS:
        raise ValueError(f"not a toy prompt: {prompt!r} (expected e.g. {PROMPTS[0]!r})")
    return color, shape, background


def toy_reward(images: torch.Tensor, prompts: list[str], tau: float = 0.2) -> torch.Tensor:
    """Fraction of the image painted in the prompt's object colour, softly.

        r(x, z) = mean_pixels exp(-||x_p - c(z)||^2 / (2 tau^2)),   x in [0, 1]^(3, H, W), c(z) the colour named in z

    images: (N, 3, H, W) in [0, 1]; returns (N,) float32 in [0, 1]. A bigger shape of the right colour scores higher;
    the wrong colour scores about 0.
    """
    target = torch.tensor([COLORS[parse_prompt(p)[0]] for p in prompts], dtype=torch.float32, device=images.device)
    target = (target / 255.0)[:, :, None, None]  # (N, 3, 1, 1)
    dist2 = (images.float() - target).pow(2).sum(dim=1)  # (N, H, W)
    return torch.exp(-dist2 / (2 * tau**2)).mean(dim=(1, 2))


def color_accuracy(images: torch.Tensor, prompts: list[str]) -> float:
    """Fraction of images whose dominant object colour (by the toy reward) is the one their prompt names."""
    hits = 0
    for img, prompt in zip(images, prompts):
        color = parse_prompt(prompt)[0]
        scores = {c: toy_reward(img[None], [prompt.replace(color, c, 1)]).item() for c in COLORS}
        hits += max(scores, key=scores.get) == color
    return hits / len(prompts)


# ----------------------------------------------------------------------------------------------------------------
# Procedural images
# ----------------------------------------------------------------------------------------------------------------
def draw(prompt: str, rng: random.Random, size: float | None = None, color: str | None = None) -> Image.Image:
    """Draw the prompt's shape (radius `size` in pixels, random if None) at a random place, antialiased.

    `color` overrides the prompt's object colour (for the mismatched "bad" images of the binary data set).
    """
    obj, shape, bg = parse_prompt(prompt)
    s = 4  # draw at 4x and downsample: antialiased edges, like a real image
    R = RESOLUTION
    radius = size if size is not None else rng.uniform(3.5, 12.0)
    cx, cy = rng.uniform(radius + 1, R - radius - 1), rng.uniform(radius + 1, R - radius - 1)
    jitter = lambda c: tuple(int(min(255, max(0, v + rng.randint(-12, 12)))) for v in c)  # noqa: E731
    img = Image.new("RGB", (R * s, R * s), jitter(BACKGROUNDS[bg]))
    box = [(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s]
    fill = jitter(COLORS[color or obj])
    if shape == "circle":
        ImageDraw.Draw(img).ellipse(box, fill=fill)
    else:
        radius_sq = radius * math.sqrt(math.pi) / 2  # same area as the circle of that radius
        box = [(cx - radius_sq) * s, (cy - radius_sq) * s, (cx + radius_sq) * s, (cy + radius_sq) * s]
        ImageDraw.Draw(img).rectangle(box, fill=fill)
    return img.resize((R, R), Image.Resampling.BOX)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])).permute(0, 3, 1, 2)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# The tiny SD1.5-shaped model
# ----------------------------------------------------------------------------------------------------------------
def make_tokenizer():
    """A CLIPTokenizer (byte-level BPE, as SD1.5's) over the toy vocabulary, built without downloaded files."""
    from transformers import CLIPTokenizer

    words = sorted({w for p in PROMPTS for w in p.split()}, key=lambda w: (-len(w), w))
    chars = sorted({c for w in words for c in w})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:  # longest words first, so their merges outrank the short words' and each word is one token
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            pair = (toks[0], toks[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(toks[0] + toks[1], len(vocab))
            toks = [toks[0] + toks[1]] + toks[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def make_models(vocab_size: int, bos: int, eos: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        )
    )
    # SD1.5's VAE downsamples 8x with 4 blocks; ours 4x with 3 (32 px -> 8x8 latents), without the mid-block
    # attention, so that training and sampling stay cheap on a CPU.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=RESOLUTION,
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=8,
    )
    # SD1.5's noise schedule exactly (its scheduler/scheduler_config.json), with DDIM as the sampling default.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return text_encoder, vae, unet, scheduler


def _train_vae(vae, images: torch.Tensor, steps: int, batch: int, gen: torch.Generator) -> None:
    # Start the posterior's log-variance at -10 (std 0.007): sampling is then nearly deterministic from the first
    # step and reconstruction converges in a few hundred steps instead of thousands; the KL term keeps it honest.
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -10.0
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)] * 2 - 1
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _train_unet(unet, latents, cond, uncond, steps: int, batch: int, gen: torch.Generator, scheduler) -> None:
    """The epsilon-prediction denoising loss SD1.5 was trained with: ||eps - eps_theta(x_t, t, c)||^2."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, 50, steps)
    alpha_bar = scheduler.alphas_cumprod  # (1000,)
    for _ in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # q(x_t | x_0)
        c = cond[idx].clone()  # (batch, 77, 32)
        c[torch.rand(batch, generator=gen) < 0.1] = uncond  # caption dropout, so classifier-free guidance works
        loss = F.mse_loss(unet(x_t, t, c).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()


def _train_clip(clip, pixel_values, input_ids, steps: int, batch: int, gen: torch.Generator) -> None:
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        idx = torch.randint(len(pixel_values), (batch,), generator=gen)
        out = clip(input_ids=input_ids[idx], pixel_values=pixel_values[idx], return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()


# ----------------------------------------------------------------------------------------------------------------
# Data sets in the real layouts
# ----------------------------------------------------------------------------------------------------------------
def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _reward(image: Image.Image, prompt: str) -> float:
    """The toy reward of one PIL image: how the toy "humans" of every data set judge it."""
    return float(toy_reward(to_tensor([image]), [prompt])[0])


def _write_imagereward(root: Path, pipe, seed: int, scale: float = 1.0) -> None:
    """ImageRewardDB: images of a prompt ranked by people, 1 (best) .. k; equal rounded rewards share a rank.

    As in the real one, the images are the generators' own: here the toy model's samples for the prompt, each with a
    sampler setting of its own (DDIM 5, 10 or 20 steps, η 0 or 1, guidance 3, 5 or 7.5, as the real data mixes
    models and settings), ranked by the toy reward. A reward model fitted to this data has seen the blobs, wrong
    colours and noise that the model really draws, which is what DPOK then samples and scores (drawn shapes instead
    gave a reward that rose where the true one fell: docs/dpok.md, "On a learned reward").
    """
    n_ = lambda n: max(8, int(n * scale))  # noqa: E731
    pipe.set_progress_bar_config(disable=True)  # its scheduler is DDIM already (make_models), so η applies
    rng = random.Random(f"{seed}-imagereward")
    settings = [(steps, eta, w) for steps in (5, 10, 20) for eta in (0.0, 1.0) for w in (3.0, 5.0, 7.5)]
    for split, n_prompts in (("train", n_(300)), ("validation", n_(40)), ("test", n_(40))):
        # Plan every image (prompt, sampler setting, seed), then draw them grouped by setting, 64 at a time.
        plan = [(rng.choice(PROMPTS), rng.randint(4, 7)) for _ in range(n_prompts)]
        jobs: dict[tuple, list] = {}  # sampler setting -> [(prompt index j, image k, prompt, seed)]
        for j, (p, n) in enumerate(plan):
            for k in range(n):
                jobs.setdefault(rng.choice(settings), []).append((j, k, p, rng.randrange(2**31)))
        drawn = {}
        for (steps, eta, w), mine in jobs.items():
            for b in range(0, len(mine), 64):
                batch = mine[b : b + 64]
                images = pipe([p for _, _, p, _ in batch], num_inference_steps=steps, eta=eta, guidance_scale=w,
                              generator=[torch.Generator().manual_seed(g) for *_, g in batch]).images
                drawn |= {(j, k): im for (j, k, *_), im in zip(batch, images)}
        rows, part = [], f"{split}_1"
        zpath = root / "imagereward" / "images" / split / f"{part}.zip"
        zpath.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zpath, "w") as zf:
            for j, (p, n) in enumerate(plan):
                imgs = [drawn[j, k] for k in range(n)]
                scores = [round(_reward(im, p), 2) for im in imgs]
                distinct = sorted(set(scores), reverse=True)
                for k, (im, sc) in enumerate(zip(imgs, scores)):
                    name = f"{split}-{j:04d}-{k}.png"
                    zf.writestr(f"{part}/{name}", png_bytes(im))
                    rows.append(dict(
                        image_path=f"images/{split}/{part}/{name}", prompt_id=f"{split}-{j:04d}", prompt=p,
                        classification="toy", image_amount_in_total=len(imgs), rank=distinct.index(sc) + 1,
                        overall_rating=int(1 + 6 * sc),
                    ))
        _write_parquet(rows, root / "imagereward" / f"metadata-{split}.parquet")


def _write_datasets(root: Path, rng: random.Random, scale: float = 1.0) -> None:
    n_ = lambda n: max(8, int(n * scale))  # noqa: E731  (scale < 1: the reduced build of the tests)
    # Pick-a-Pic v2: pairs of images for one caption; the "human" prefers the higher toy reward, a tie when the
    # rewards are within 0.01 (about 8 % of pairs), as Pick-a-Pic's 0.5/0.5 rows.
    for split, n in (("train", n_(2000)), ("validation", n_(200)), ("test", n_(200))):
        rows = []
        for i in range(n):
            p = rng.choice(PROMPTS)
            im0, im1 = draw(p, rng), draw(p, rng)
            r0, r1 = _reward(im0, p), _reward(im1, p)
            label_0 = 0.5 if abs(r0 - r1) < 0.01 else float(r0 > r1)
            uid0, uid1 = f"{split}-{i}-0", f"{split}-{i}-1"
            best = {1.0: uid0, 0.0: uid1}.get(label_0, "")
            rows.append(dict(
                caption=p, jpg_0=png_bytes(im0), jpg_1=png_bytes(im1), label_0=label_0, label_1=1.0 - label_0,
                image_0_uid=uid0, image_1_uid=uid1, best_image_uid=best, ranking_id=i, has_label=True,
                are_different=True, model_0="toy", model_1="toy",
            ))
        _write_parquet(rows, root / "pickapic" / split / "part-0.parquet")
    # Binary labels (Lee et al. 2023): good (1) when the shape has the prompt's colour and is large enough; a third
    # of the images are drawn in a wrong colour, so text alignment matters as well as size.
    for split, n in (("train", n_(1500)), ("validation", n_(300))):
        rows = []
        for _ in range(n):
            p = rng.choice(PROMPTS)
            wrong = rng.random() < 1 / 3
            color = rng.choice([c for c in COLORS if c != parse_prompt(p)[0]]) if wrong else None
            im = draw(p, rng, color=color)
            rows.append(dict(prompt=p, image=png_bytes(im), label=int(_reward(im, p) > 0.2)))
        _write_parquet(rows, root / "binary" / f"{split}.parquet")
    rows = []
    for _ in range(n_(1000)):
        p = rng.choice(PROMPTS)
        rows.append(dict(caption=p, image=png_bytes(draw(p, rng))))
    _write_parquet(rows, root / "pretrain.parquet")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Building and caching
# ----------------------------------------------------------------------------------------------------------------
def build(root: Path, seed: int = 0, vae_steps: int = 700, unet_steps: int = 1000, clip_steps: int = 150,
          data_scale: float = 1.0) -> None:
    """Build the whole world into `root` (overwriting). Deterministic from `seed` on a given machine and thread
    count; other CPUs give other last bits (hence the shipped copy). Smaller steps/data_scale: a quick check."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    t0 = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_encoder, vae, unet, scheduler = make_models(len(tokenizer), bos, eos)
    text_encoder.requires_grad_(False)  # frozen, as SD's; random here, yet its outputs tell the prompts apart

    # Training images for the generator: every prompt, many sizes and places.
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(2400)]
    images = to_tensor([draw(p, rng) for p in prompts])  # (2400, 3, 32, 32) in [0, 1]

    log = lambda what: print(f"  toy world: {what} ({time.time() - t0:.0f} s)", flush=True)  # noqa: E731
    _train_vae(vae, images, vae_steps, 16, gen)
    log(f"VAE trained, {vae_steps} steps")
    vae.requires_grad_(False)
    with torch.no_grad():
        mean_latents = torch.cat([vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(images), 256)])
    # SD1.5 scales latents to about unit variance (its 0.18215); measure ours the same way.
    vae.register_to_config(scaling_factor=float(1.0 / mean_latents.std()))
    latents = mean_latents * vae.config.scaling_factor  # (2400, 4, 8, 8)

    with torch.no_grad():
        ids = tokenizer(PROMPTS + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        embeds = text_encoder(ids).last_hidden_state  # (25, 77, 32)
    cond = embeds[[PROMPTS.index(p) for p in prompts]]
    _train_unet(unet, latents, cond, embeds[-1], unet_steps, 32, gen, scheduler)
    log(f"UNet trained, {unet_steps} steps")

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipeline")

    # The tiny CLIP: image and text towers trained contrastively for a moment, so its embeddings mean something.
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(image_size=RESOLUTION, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32,
    ))
    image_processor = CLIPImageProcessor(size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    pixel_values = processor(images=[draw(p, rng) for p in prompts[:1200]], return_tensors="pt").pixel_values
    clip_ids = tokenizer(prompts[:1200], padding="max_length", max_length=77, return_tensors="pt").input_ids
    _train_clip(clip, pixel_values, clip_ids, clip_steps, 64, gen)
    log(f"CLIP trained, {clip_steps} steps")
    clip.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")

    _write_datasets(root, rng, data_scale)
    _write_imagereward(root, pipe, seed, data_scale)
    log("data sets written")
    (root / "world.json").write_text(json.dumps(dict(version=VERSION, seed=seed, data_scale=data_scale,
                                                   build_seconds=round(time.time() - t0, 1))))


def built_once(root: Path, version: str, what: str, build_into) -> Path:
    """`root`, built by `build_into(tmp_folder)` unless its world.json already has `version`. Safe to call from
    several processes at once (pytest workers, torchrun ranks): one builds, under a file lock, into a temporary
    folder that is renamed into place when complete; the others wait and reuse it."""
    from filelock import FileLock

    stamp = root / "world.json"

    def ready() -> bool:
        return stamp.exists() and json.loads(stamp.read_text()).get("version") == version

    if not ready():
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):
            if not ready():
                print(f"building {what} in {root}...", flush=True)
                tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                threads = torch.get_num_threads()
                build_into(tmp)
                torch.set_num_threads(threads)
                shutil.rmtree(root, ignore_errors=True)
                os.replace(tmp, root)
    return root


def toy_world(root: str | os.PathLike | None = None, seed: int = 0) -> ToyWorld:
    """The toy world at `root` (default `$TOY_WORLD_DIR` or the shipped `<repo>/toy_world`), built if missing
    (process-safe: `built_once`)."""
    root = Path(root or os.environ.get("TOY_WORLD_DIR") or DEFAULT_ROOT).resolve()
    return ToyWorld(root=built_once(root, VERSION, "the toy world (about five minutes on 2 idle CPU cores)",
                                    lambda tmp: build(tmp, seed=seed)))


# ----------------------------------------------------------------------------------------------------------------
# The toy SDXL world: an SDXL-shaped pipeline over the same images and data sets, built only when asked for
# ----------------------------------------------------------------------------------------------------------------
SDXL_VERSION = "1"
DEFAULT_SDXL_ROOT = Path(__file__).resolve().parent.parent / "toy_world_sdxl"  # shipped, as toy_world/
TIME_EMBED_DIM = 8  # SDXL: 256 per time_id; 6 time_ids + the pooled text embedding feed its added embedding


def make_sdxl_models(vocab_size: int, bos: int, eos: int):
    """StableDiffusionXLPipeline's parts at toy size, from configs (attention in both UNet blocks, as the SD1.5 toy;
    SDXL's first block has none, which at 8x8 latents leaves the caption too little say): CLIPTextModel + CLIPTextModelWithProjection
    (SDXL: CLIP ViT-L and OpenCLIP bigG), a UNet whose cross-attention takes both encoders' hidden states side by
    side (32 + 32 = 64 features; SDXL: 768 + 1280 = 2048) and whose added embedding ("text_time") takes the second
    encoder's pooled projection (32; SDXL 1280) and the 6 time_ids, and SDXL's scheduler config."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                hidden_act="gelu")  # 3 layers, so the penultimate hidden state SDXL uses is not the embedding alone
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64, attention_head_dim=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + 32,
    )
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json, the same noise schedule as SD1.5's.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
        use_karras_sigmas=False,
    )
    return text_encoder, text_encoder_2, unet, scheduler


def build_sdxl(root: Path, world: ToyWorld, seed: int = 0, unet_steps: int = 1000) -> None:
    """The toy SDXL pipeline into `root/pipeline`: the SD1.5 toy world's trained VAE and tokenizer (both encoders
    share it, as SDXL's two tokenizers share CLIP's BPE), two fresh frozen text encoders, and a UNet trained for
    `unet_steps` on the same toy images with SDXL's conditioning (time_ids (32, 32, 0, 0, 32, 32): uncropped squares)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    t0 = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(world.pipeline / "tokenizer")
    vae = AutoencoderKL.from_pretrained(world.pipeline / "vae").requires_grad_(False)
    text_encoder, text_encoder_2, unet, scheduler = make_sdxl_models(len(tokenizer), tokenizer.bos_token_id,
                                                                     tokenizer.eos_token_id)
    text_encoder.requires_grad_(False)
    text_encoder_2.requires_grad_(False)

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(2400)]
    images = to_tensor([draw(p, rng) for p in prompts])  # (2400, 3, 32, 32) in [0, 1]
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256] * 2 - 1).latent_dist.mean for i in range(0, 2400, 256)])
        ids = tokenizer(PROMPTS + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        out_1 = text_encoder(ids, output_hidden_states=True)
        out_2 = text_encoder_2(ids, output_hidden_states=True)
    latents = latents * vae.config.scaling_factor  # (2400, 4, 8, 8)
    hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (25, 77, 64)
    pooled = out_2.text_embeds  # (25, 32)
    time_ids = torch.tensor([RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION], dtype=torch.float32)
    rows = torch.tensor([PROMPTS.index(p) for p in prompts])

    from diffusers.optimization import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, 50, unet_steps)
    alpha_bar = scheduler.alphas_cumprod  # (1000,)
    batch = 32
    for _ in range(unet_steps):  # the ε-prediction loss SDXL was trained with, as _train_unet
        idx = torch.randint(len(latents), (batch,), generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(latents[idx].shape, generator=gen)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents[idx] + (1 - a).sqrt() * eps
        which = rows[idx].clone()
        which[torch.rand(batch, generator=gen) < 0.1] = len(PROMPTS)  # caption dropout to "", for guidance
        added = {"text_embeds": pooled[which], "time_ids": time_ids.repeat(batch, 1)}
        loss = F.mse_loss(unet(x_t, t, hidden[which], added_cond_kwargs=added).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
    # force_zeros_for_empty_prompt=False: the unconditional branch of guidance is the encoded "", which is what the
    # toy UNet (and Diffusion-DPO's prompt dropout) trained on. The real SDXL base sets it True (zeros).
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(root / "pipeline")
    (root / "world.json").write_text(json.dumps(dict(version=SDXL_VERSION, seed=seed, unet_steps=unet_steps,
                                                     build_seconds=round(time.time() - t0, 1))))


def toy_model_in(argv: list[str]) -> str:
    """The --toy-model a command line asks for ("sd15" unless "sdxl"), read before parsing so that --toy's
    defaults (the scripts' toy_defaults) can point at the right pipeline."""
    pairs = zip(argv, argv[1:] + [""])
    sdxl = any(a in ("--toy-model=sdxl", "--toy_model=sdxl") or (a in ("--toy-model", "--toy_model") and b == "sdxl")
               for a, b in pairs)
    return "sdxl" if sdxl else "sd15"


def toy_sdxl_pipeline(root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The toy SDXL pipeline folder (`$TOY_SDXL_DIR`, default the shipped `<repo>/toy_world_sdxl`, + /pipeline), built on first
    use (a few CPU-minutes: 1000 UNet steps) from the SD1.5 toy world, whose data sets it shares. Process-safe as toy_world."""
    world = toy_world()
    root = Path(root or os.environ.get("TOY_SDXL_DIR") or DEFAULT_SDXL_ROOT).resolve()
    return built_once(root, SDXL_VERSION, "the toy SDXL pipeline (a few minutes)",
                      lambda tmp: build_sdxl(tmp, world, seed=seed)) / "pipeline"


if __name__ == "__main__":
    # `python -m common.toy [--rebuild] [--root DIR]`: (re)build the world, then sample every prompt from the toy
    # pipeline with fixed seeds and save a captioned grid.
    import argparse

    from diffusers import StableDiffusionPipeline

    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("--rebuild", action="store_true", help="build the world anew from its seed (about 5 min)")
    cli.add_argument("--root", default=None, help="the world's folder (default $TOY_WORLD_DIR or <repo>/toy_world)")
    opts = cli.parse_args()
    root = Path(opts.root or os.environ.get("TOY_WORLD_DIR") or DEFAULT_ROOT)
    if opts.rebuild:
        (root / "world.json").unlink(missing_ok=True)  # toy_world() then builds it, under its lock
    world = toy_world(root)
    pipe = StableDiffusionPipeline.from_pretrained(world.pipeline)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    out = pipe(PROMPTS, num_inference_steps=25, guidance_scale=3.0, generator=gens, output_type="pt",
               height=RESOLUTION, width=RESOLUTION)
    images = out.images  # (24, 3, 32, 32) in [0, 1]
    r = toy_reward(images, PROMPTS)
    print(f"toy reward of the base model's samples: mean {r.mean():.3f}, std {r.std():.3f}; "
          f"prompt colour right in {color_accuracy(images, PROMPTS):.0%} of them")
    from common.runtime import save_image_grid

    out_path = Path(__file__).resolve().parent.parent / "docs" / "toy_samples.png"
    out_path.parent.mkdir(exist_ok=True)
    save_image_grid(images, out_path, nrow=6, captions=[p.removeprefix("a ").replace(" background", "") for p in PROMPTS], upscale=4)
    print(f"wrote {out_path}")
