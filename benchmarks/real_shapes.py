"""Randomly initialised pipelines at the real published shapes, and data in the real layouts at the real sizes.

The toy world (common/toy.py) runs every script's code path on a 1M-parameter model at 32 px. What a researcher
meets first on a GPU is the real model: the 77-token CLIP text encoder, the VAE's scaling factor at 512 px, SDXL's
two text encoders and 1024 px time ids, multi-GiB checkpoints. The hub is unreachable here, so the weights never
come; the shapes can. This module writes

    pipeline("sd15", DIR)    stable-diffusion-v1-5's folder layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/
    pipeline("sdxl", DIR)    stable-diffusion-xl-base-1.0's: + text_encoder_2/ tokenizer_2/
    pickapic(DIR, n)         Pick-a-Pic v2 rows: every column of the real parquet, 512 px JPEGs (one 768x512)
    imagereward(DIR, n)      ImageRewardDB: metadata-<split>.parquet and images/<split>/<split>_N.zip
    scorer_files(NAME, DIR)  a scorer's weights as downloaded (HPS v2.1, ImageReward, PickScore, aesthetic, CLIP)

so that every script loads them with `--model DIR` / `--dataset-source DIR` exactly as it loads the hub's. The
configurations ship with the project (benchmarks/configs/<name>/, the published config.json files, written out);
weights never do: each component is built from its config with the library's own random initialisation (seeded)
and saved with save_pretrained (safetensors). One departure from the published files: SD1.5's model_index.json
lists no safety_checker / feature_extractor (the scripts build their pipelines with safety_checker=None; the real
one's 1.2 GB CLIP vision tower would only add build time). Scores, samples and losses from these models are noise; shapes,
memory, speed, file sizes, and whether every script runs end to end at the real size are not.

The tokenizers. CLIP's BPE vocabulary (vocab.json, merges.txt: 49408 tokens) is OpenAI's file and does not ship
here; nothing installed holds a copy. `clip_tokenizer` builds a stand-in with the same structure and ids: byte-level
BPE, the 256 byte symbols and their 256 end-of-word forms first, then merges of lower-case letter n-grams up to
49406 entries, then <|startoftext|> = 49406 and <|endoftext|> = 49407, max length 77, as CLIP's. So every caption
tokenizes to 77 ids in [0, 49408) with BOS first and EOS the largest id (what CLIPTextModel's pooled output, eos
id 2 in the published config, relies on: it takes the argmax id's position); the words are split differently from
CLIP's. SDXL's second tokenizer pads with "!" (id 0), as the published tokenizer_2 does.

    python benchmarks/real_shapes.py --out /data/real --models sd15 sdxl      # both pipelines and the data
    python benchmarks/real_shapes.py --out /tmp/r --models sd15 --scale 0.25  # a shrunken SD1.5 (tests of this file)
    python benchmarks/real_shapes.py --out /data/real --models --scorers hps imagereward pickscore aesthetic clip

A pipeline takes 4.3 GB on disk (SD1.5) or 13.9 GB (SDXL, float32 as the published main files; --dtype float16
halves it); building one takes about a minute.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import numpy as np
import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
Name = Literal["sd15", "sdxl"]
VOCAB_SIZE = 49408  # CLIP's, both of SDXL's encoders too
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ---------------------------------------------------------------- the stand-in CLIP tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the base alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(pad_token: str = EOS):
    """A CLIPTokenizer with CLIP's 49408-id layout (see the module docstring); deterministic, no downloaded file."""
    from transformers import CLIPTokenizer

    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]  # 512 symbols, as CLIP's vocab.json begins
    merges: list[tuple[str, str]] = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    budget = VOCAB_SIZE - 2 - len(tokens)

    def add(a: str, b: str) -> None:
        if len(merges) < budget:
            merges.append((a, b))
            tokens.append(a + b)

    for a in letters:  # letter pairs, inside a word and at its end
        for b in letters:
            add(a, b)
            add(a, b + "</w>")
    for ab in [a + b for a in letters for b in letters]:  # trigrams, then 4-grams of two pairs, to fill the table
        for c in letters:
            add(ab, c)
            add(ab, c + "</w>")
    for ab in [a + b for a in letters for b in letters]:
        for cd in [c + d for c in letters for d in letters]:
            add(ab, cd)
    tokens += [BOS, EOS]
    assert len(tokens) == VOCAB_SIZE and len(set(tokens)) == VOCAB_SIZE
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, bos_token=BOS, eos_token=EOS,
                         unk_token=EOS, pad_token=pad_token)


# ---------------------------------------------------------------- the pipelines
def _scaled(config: dict, scale: float) -> dict:
    """A shrunken copy of a UNet/VAE/CLIP config (scale < 1: for the quick tests of this file only); 1: as is."""
    if scale == 1:
        return config
    c = dict(config)
    rnd = lambda v, m=32: max(m, int(v * scale) // m * m)  # noqa: E731  (group norm: multiples of 32)
    if "block_out_channels" in c:
        c["block_out_channels"] = [rnd(v) for v in c["block_out_channels"]]
        c["sample_size"] = 8  # 64 px images
        if "transformer_layers_per_block" in c:
            c["transformer_layers_per_block"] = 1
        if isinstance(c.get("attention_head_dim"), list):  # SDXL: heads of 64 features
            c["attention_head_dim"] = [max(1, v // 64) for v in c["block_out_channels"]]
        if c.get("projection_class_embeddings_input_dim"):  # 6 time ids x 256 + the pooled text width
            c["addition_time_embed_dim"] = 32
    if "hidden_size" in c:
        c.update(hidden_size=rnd(c["hidden_size"], 64), intermediate_size=rnd(c["intermediate_size"], 64),
                 num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=rnd(c["projection_dim"], 64))
    return c


def pipeline(name: Name, out: str | os.PathLike, seed: int = 0, dtype: str = "float32", scale: float = 1.0) -> Path:
    """Write a randomly initialised `name` pipeline into `out` in diffusers' folder layout (see the module docstring).
    Each component is built from its published config, seeded, saved, and freed before the next (peak memory: the
    largest component, SDXL's UNet: 10.3 GB in float32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    src, out = CONFIGS / name, Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "model_index.json", out / "model_index.json")
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy(src / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    torch_dtype = getattr(torch, dtype)
    load = lambda sub, file="config.json": json.loads((src / sub / file).read_text())  # noqa: E731
    unet_cfg, vae_cfg = _scaled(load("unet"), scale), _scaled(load("vae"), scale)
    encoders = [("text_encoder", CLIPTextModel)] + ([("text_encoder_2", CLIPTextModelWithProjection)] * (name == "sdxl"))
    text_cfgs = {sub: _scaled(load(sub), scale) for sub, _ in encoders}
    if name == "sdxl":  # the UNet's cross-attention width and added embedding follow the (possibly scaled) encoders
        widths = [text_cfgs[sub]["hidden_size"] for sub, _ in encoders]
        unet_cfg["cross_attention_dim"] = sum(widths)
        unet_cfg["projection_class_embeddings_input_dim"] = (6 * unet_cfg["addition_time_embed_dim"]
                                                             + text_cfgs["text_encoder_2"]["projection_dim"])
    elif scale != 1:
        unet_cfg["cross_attention_dim"] = text_cfgs["text_encoder"]["hidden_size"]
    for k, (sub, build) in enumerate([("unet", lambda: UNet2DConditionModel.from_config(unet_cfg)),
                                      ("vae", lambda: AutoencoderKL.from_config(vae_cfg))]
                                     + [(sub, lambda sub=sub, cls=cls: cls(CLIPTextConfig(**text_cfgs[sub])))
                                        for sub, cls in encoders]):
        torch.manual_seed(seed + k)
        model = build()
        model = model if torch_dtype == torch.float32 else model.to(torch_dtype)
        model.save_pretrained(out / sub)  # safetensors
        del model
    tokenizer = clip_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    if name == "sdxl":
        clip_tokenizer(pad_token="!").save_pretrained(out / "tokenizer_2")
    (out / "REAL_SHAPES.json").write_text(json.dumps(dict(
        name=name, seed=seed, dtype=dtype, scale=scale, weights="random (library initialisation), not trained",
        tokenizer="stand-in CLIP BPE with CLIP's 49408-id layout (benchmarks/real_shapes.py: clip_tokenizer)"),
        indent=1) + "\n")
    return out


# ---------------------------------------------------------------- the scorers (common/scorers.py) at their real architectures
# CLIP ViT-H/14 (PickScore's and HPS v2.1's backbone: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config) and a tiny one.
CLIP_SHAPES = {
    "vit-h-14": dict(text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                     vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                 patch_size=14, image_size=224), projection_dim=1024, act="gelu"),
    "tiny": dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             patch_size=8, image_size=32), projection_dim=16, act="gelu"),
}


def _clip_model_and_processor(kind: str):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from common.scorers import CLIP_MEAN, CLIP_STD

    shape = CLIP_SHAPES[kind]
    tok = clip_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, max_position_embeddings=77, hidden_act=shape["act"], **shape["text"], **ids),
        vision_config=dict(hidden_act=shape["act"], **shape["vision"]), projection_dim=shape["projection_dim"]))
    side = shape["vision"]["image_size"]
    processor = CLIPProcessor(tokenizer=tok, image_processor=CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD)))
    return model, processor


def clip_scorer(folder: str | os.PathLike, kind: Literal["vit-h-14", "tiny"] = "vit-h-14", seed: int = 0) -> Path:
    """A CLIPModel + processor folder at `kind`'s shape, random weights: what --scorer pickscore / clip take as
    --scorer-path (and --clip-path)."""
    torch.manual_seed(seed)
    model, processor = _clip_model_and_processor(kind)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def bert_tokenizer(folder: str | os.PathLike):
    """A stand-in for bert-base-uncased's WordPiece tokenizer (BLIP's, ImageReward's): its 30522-id layout ([PAD] 0,
    [unused0-98], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then word pieces), lower-case letter n-grams as the
    pieces. The real vocabulary does not ship here."""
    from transformers import BertTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = list(letters) + list("0123456789.,!?'-") + [f"##{c}" for c in letters]
    pieces += [a + b for a in letters for b in letters] + [f"##{a}{b}" for a in letters for b in letters]
    pieces += [a + b + c for a in letters for b in letters for c in letters]
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]
    vocab = vocab[:30522]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def real_scorer(name: Literal["hps", "imagereward"], work: Path, tiny: bool = False, dtype=torch.float32):
    """common/scorers.py's HPS v2.1 or ImageReward scorer module at its real architecture with random weights
    (tiny=True: shrunk), built in memory: the forward pass every script runs, for timing."""
    from common import scorers

    if name == "hps":  # OpenCLIP ViT-H/14 loaded into transformers' CLIPModel, then 100 · cos (ClipScoreRaw)
        model, processor = _clip_model_and_processor("tiny" if tiny else "vit-h-14")
        processor.save_pretrained(work / "hps_processor")
        return scorers.ClipScoreRaw(scorers.ClipBackbone("hps (random)", str(work / "hps_processor"), dtype,
                                                         model=model), 64)
    # ImageReward: BLIP ViT-L/16 at 224 px + BERT-base with cross-attention; ImageRewardModel reads its vision sizes
    # from the weights' shapes, so shapes alone (meta tensors) build it, randomly initialised.
    width, layers, patch, grid = (64, 2, 16, 2) if tiny else (1024, 24, 16, 14)
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    shapes = {"vision_model.embeddings.class_embedding": meta(1, 1, width),
              "vision_model.embeddings.patch_embedding.weight": meta(width, 3, patch, patch),
              "vision_model.embeddings.position_embedding": meta(1, 1 + grid * grid, width),
              **{f"vision_model.encoder.layers.{i}.mlp.fc1.weight": meta(4 * width, width) for i in range(layers)}}
    med = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2) if tiny else {}
    model = scorers.ImageRewardModel(shapes, med).to(dtype)
    model.mlp.float()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert_tokenizer(work / "bert"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return scorers.ImageRewardScore(model, tokenizer, 64)


# ---------------------------------------------------------------- running a script at the real shapes
def run_measured(cmd: list[str], cwd: str | os.PathLike, kill_when: Path | None = None,
                 timeout: float = 3600) -> tuple[int, str, float]:
    """Run `cmd` in `cwd`, its output to a log file; SIGKILL it as soon as `kill_when` exists (a checkpoint written:
    the kill -9 of a resume test), or after `timeout` s. Returns (exit status, output, peak RSS in GiB of that process
    alone: os.wait4's rusage, so other processes on the machine do not count)."""
    import signal
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if kill_when is not None and kill_when.exists():  # `latest` is renamed into place after the checkpoint
                proc.send_signal(signal.SIGKILL)  # at once: on a GPU the next step and the final save take ~1 s
                kill_when = None
            if time.time() - t0 > timeout:
                proc.kill()
            time.sleep(0.1 if kill_when is not None else 0.5)
        f.seek(0)
        return os.waitstatus_to_exitcode(status), f.read(), usage.ru_maxrss / 2**20


# ---------------------------------------------------------------- the data
def _image(rng: np.random.Generator, width: int, height: int) -> "PIL.Image.Image":  # noqa: F821
    """A random smooth colour field with noise (JPEG-compressible like a photo, unlike white noise)."""
    from PIL import Image

    low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.float32)
    img = img + rng.normal(0, 12, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


CAPTIONS = ["a photograph of an astronaut riding a horse on the moon, highly detailed, 4k",
            "an oil painting of a lighthouse in a storm", "a cat wearing a tiny wizard hat, studio lighting",
            "isometric pixel art of a cosy cabin in the woods", "a bowl of ramen, food photography, bokeh",
            "a futuristic city at sunset, concept art, trending on artstation",
            "a watercolour of a red fox in the snow", "portrait of an old fisherman, dramatic light, 85mm"]


def pickapic(root: str | os.PathLike, n: int = 8, size: int = 512, seed: int = 0,
             splits: tuple[str, ...] = ("train", "validation", "test")) -> Path:
    """Pick-a-Pic v2 in its hub layout, `root/<split>/part-0.parquet`, with every column of the real parquet
    (are_different, best_image_uid, caption, created_at, has_label, image_0_uid, image_0_url, image_1_uid,
    image_1_url, jpg_0, jpg_1, label_0, label_1, model_0, model_1, ranking_id, user_id, num_example_per_prompt,
    __index_level_0__); JPEG bytes at `size` px, one pair per split at 1.5x width (the real data mixes sizes), and
    one tie (0.5/0.5, which the scripts drop) per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    t0 = datetime(2023, 4, 1)
    for split in splits:
        rows = []
        for i in range(n):
            w = size * 3 // 2 if i == 1 else size
            label_0 = 0.5 if i == 2 else float(rng.integers(0, 2))
            uid = [f"{split}-{i}-{k}-{rng.integers(1 << 62):x}" for k in range(2)]
            rows.append(dict(
                are_different=True, best_image_uid={1.0: uid[0], 0.0: uid[1]}.get(label_0, ""),
                caption=CAPTIONS[i % len(CAPTIONS)], created_at=t0 + timedelta(minutes=int(rng.integers(10**5))),
                has_label=True, image_0_uid=uid[0], image_0_url=f"https://example.invalid/{uid[0]}.png",
                image_1_uid=uid[1], image_1_url=f"https://example.invalid/{uid[1]}.png",
                jpg_0=_jpeg(_image(rng, w, size)), jpg_1=_jpeg(_image(rng, w, size)), label_0=label_0,
                label_1=1.0 - label_0, model_0="stabilityai/stable-diffusion-2-1", model_1="CompVis/stable-diffusion-v1-4",
                ranking_id=int(rng.integers(10**6)), user_id=int(rng.integers(10**5)), num_example_per_prompt=1,
                __index_level_0__=i))
        path = Path(root) / split / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return Path(root)


def imagereward(root: str | os.PathLike, prompts: int = 4, images: int = 4, size: int = 512, seed: int = 0,
                splits: tuple[str, ...] = ("train", "validation", "test"), zips: int = 2) -> Path:
    """ImageRewardDB in its hub layout: `root/metadata-<split>.parquet` (image_path, prompt_id, prompt,
    classification, image_amount_in_total, rank, overall_rating, image_text_alignment_rating, fidelity_rating) and
    the images as `images/<split>/<split>_<k>.zip` with members `<split>_<k>/<file>.webp`; prompts spread over `zips`
    archives, ranks 1 (best) .. `images`, with one tie per prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in splits:
        rows, archives = [], {}
        for j in range(prompts):
            part = f"{split}_{j % zips + 1}"
            if part not in archives:
                (root / "images" / split).mkdir(parents=True, exist_ok=True)
                archives[part] = zipfile.ZipFile(root / "images" / split / f"{part}.zip", "w")
            zf = archives[part]
            ranks = list(range(1, images + 1))
            ranks[-1] = ranks[-2]  # a tie
            for k in range(images):
                name = f"{rng.integers(1 << 62):016x}.webp"
                buf = io.BytesIO()
                _image(rng, size, size).save(buf, format="WEBP", quality=90)
                zf.writestr(f"{part}/{name}", buf.getvalue())
                rows.append(dict(image_path=f"images/{split}/{part}/{name}", prompt_id=f"{split}-{j:06d}",
                                 prompt=CAPTIONS[j % len(CAPTIONS)], classification="Arts",
                                 image_amount_in_total=images, rank=ranks[k], overall_rating=int(rng.integers(1, 8)),
                                 image_text_alignment_rating=int(rng.integers(1, 8)),
                                 fidelity_rating=int(rng.integers(1, 8))))
        for zf in archives.values():
            zf.close()
        pq.write_table(pa.Table.from_pylist(rows), root / f"metadata-{split}.parquet")
    return root


# ---------------------------------------------------------------- the scorers' files
# Each scorer's weights in the layout its download has, at the real architecture with random weights (seeded), so
# `load_scorer` (evaluate.py --scorer-paths NAME=PATH --clip-paths NAME=PATH) reads them as it reads the real ones:
#
#   name         files (under the folder passed to scorer_files)                  parameters   on disk, dtype
#   hps          hps/HPS_v2.1_compressed.pt: {"state_dict": OpenCLIP ViT-H/14}    986,109,441  1.97 GB float16
#                + clip-vit-h-14-processor/ (laion's CLIP-ViT-H-14 processor)
#   pickscore    pickscore/: a CLIPModel ViT-H/14 (config.json, model.safetensors) 986,109,441  3.94 GB float32
#                + clip-vit-h-14-processor/
#   imagereward  imagereward/ImageReward.pt (BLIP ViT-L/16 + BERT-base with        446,665,953  1.79 GB float32
#                cross-attention + the MLP) and med_config.json; + bert-base-uncased/ (bert_tokenizer)
#   aesthetic    aesthetic/sac+logos+ava1-l14-linearMSE.pth (768-d input)          927,969      3.7 MB float32
#                + clip-vit-large-patch14/
#   clip         clip-vit-large-patch14/: CLIP ViT-L/14 with its processor         427,616,513  1.71 GB float32
#
# The dtypes are the published files' (HPS v2.1's 1.9 GB "compressed" checkpoint is float16; the others float32).
# The .pt/.pth files are what the real ones are: torch.save of a plain dict of tensors (the aesthetic head's an
# OrderedDict), so torch.load(weights_only=True) reads them; never a pickled module. Their key names follow the
# official code, not our loaders: OpenCLIP's `CLIP` as HPS v2 vendors it (hpsv2/src/open_clip/model.py,
# transformer.py, model_configs/ViT-H-14.json), ImageReward's `ImageReward` module (ImageReward/ImageReward.py,
# models/BLIP/blip_pretrain.py, vit.py, med.py: `blip.visual_encoder.*`, `blip.text_encoder.*` with med.py's
# persistent position_ids, `blip.vision_proj`/`text_proj`, `mlp.layers.*`), and the aesthetic predictor's MLP
# (improved-aesthetic-predictor/simple_inference.py; the released .pth holds layers.0/2/4/6/7, float32). So a file
# loading here checks our key maps (openclip_to_transformers, imagereward_to_transformers) against the official
# layouts, not against themselves. The two CLIPModel folders are written by transformers' save_pretrained.
# Building is cheap: tensors are allocated empty (a CLIPModel on the meta device, then to_empty) and filled by
# `_random_fill`: all five took 63 s on one core (measured under contention), 4.5 GiB peak RSS (the ViT-H/14 CLIPModel).
ScorerFile = Literal["hps", "imagereward", "pickscore", "aesthetic", "clip"]
# openai/clip-vit-large-patch14's config (quick_gelu): the `clip` scorer's and the aesthetic head's backbone
CLIP_SHAPES["vit-l-14"] = dict(
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                image_size=224), projection_dim=768, act="quick_gelu")
BLIP_MED_CONFIG = {  # BLIP's configs/med_config.json, which THUDM/ImageReward ships as med_config.json
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True}


def scorer_paths(root: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Where `scorer_files` writes each scorer under `root`: name -> (--scorer-paths PATH, --clip-paths PATH)."""
    root = Path(root)
    h14, l14 = root / "clip-vit-h-14-processor", root / "clip-vit-large-patch14"
    return {"hps": (root / "hps" / "HPS_v2.1_compressed.pt", h14),
            "imagereward": (root / "imagereward", root / "bert-base-uncased"),
            "pickscore": (root / "pickscore", h14),
            "aesthetic": (root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", l14),
            "clip": (l14, l14)}


def scorer_files(name: ScorerFile, root: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write scorer `name`'s files under `root` (the table above; a file already there is kept, so scorers sharing a
    backbone or processor write it once). Returns (PATH, CLIP_PATH) for evaluate.py's `--scorer-paths NAME=PATH
    --clip-paths NAME=CLIP_PATH` (load_scorer's path=, clip_path=)."""
    path, clip_path = scorer_paths(root)[name]
    if name in ("hps", "pickscore") and not (clip_path / "preprocessor_config.json").is_file():
        _clip_processor("vit-h-14").save_pretrained(clip_path)
    if name == "hps":
        _save_plain(path, {"state_dict": _random_state(openclip_shapes("vit-h-14"), seed, torch.float16)})
    elif name == "pickscore":
        _clip_folder(path, "vit-h-14", seed, processor=False)
    elif name == "imagereward":
        path.mkdir(parents=True, exist_ok=True)
        _save_plain(path / "ImageReward.pt", _random_state(imagereward_shapes(), seed, torch.float32))
        (path / "med_config.json").write_text(json.dumps(BLIP_MED_CONFIG, indent=2) + "\n")
        bert_tokenizer(clip_path)
    elif name in ("aesthetic", "clip"):
        if not (clip_path / "model.safetensors").is_file():
            _clip_folder(clip_path, "vit-l-14", seed, processor=True)
        if name == "aesthetic":
            from collections import OrderedDict

            _save_plain(path, OrderedDict(_random_state(mlp_head_shapes("layers.", 768), seed, torch.float32)))
    else:
        raise ValueError(f"scorer {name!r}: expected one of hps, imagereward, pickscore, aesthetic, clip")
    return path, clip_path


def openclip_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """OpenCLIP `CLIP`'s state dict, key -> shape, for CLIP_SHAPES[kind] (OpenAI CLIP's names, as HPS v2's file)."""
    s = CLIP_SHAPES[kind]
    v, t, e = s["vision"], s["text"], s["projection_dim"]
    vw, tw, patch, grid = v["hidden_size"], t["hidden_size"], v["patch_size"], v["image_size"] // v["patch_size"]

    def tower(prefix: str, width: int, mlp: int, layers: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for i in range(layers):  # ResidualAttentionBlock: nn.MultiheadAttention (packed in_proj) + c_fc/c_proj MLP
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                    p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                    p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                    p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                    p + "mlp.c_fc.weight": (mlp, width), p + "mlp.c_fc.bias": (mlp,),
                    p + "mlp.c_proj.weight": (width, mlp), p + "mlp.c_proj.bias": (width,)}
        return out

    return {"positional_embedding": (77, tw), "text_projection": (tw, e), "logit_scale": (),
            "visual.class_embedding": (vw,), "visual.positional_embedding": (grid * grid + 1, vw),
            "visual.proj": (vw, e), "visual.conv1.weight": (vw, 3, patch, patch),
            "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
            **tower("visual.", vw, v["intermediate_size"], v["num_hidden_layers"]),
            "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,),
            **tower("", tw, t["intermediate_size"], t["num_hidden_layers"]),
            "token_embedding.weight": (VOCAB_SIZE, tw), "ln_final.weight": (tw,), "ln_final.bias": (tw,)}


def mlp_head_shapes(prefix: str, input_size: int) -> dict[str, tuple[int, ...]]:
    """The aesthetic predictor's / ImageReward's MLP: Linear input -> 1024 -> 128 -> 64 -> 16 -> 1 at layers.0/2/4/6/7
    (1, 3, 5 are dropouts)."""
    dims, out = [input_size, 1024, 128, 64, 16, 1], {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        out |= {f"{prefix}{i}.weight": (b, a), f"{prefix}{i}.bias": (b,)}
    return out


def imagereward_shapes(width: int = 1024, layers: int = 24, patch: int = 16, image: int = 224) -> dict[str, tuple]:
    """ImageReward v1.0's state dict, key -> shape: BLIP_Pretrain(vit='large', image_size=224) + MLP(768)."""
    vis, txt, grid, c = "blip.visual_encoder.", "blip.text_encoder.", image // patch, BLIP_MED_CONFIG
    out: dict[str, tuple] = {vis + "cls_token": (1, 1, width), vis + "pos_embed": (1, grid * grid + 1, width),
                             vis + "patch_embed.proj.weight": (width, 3, patch, patch),
                             vis + "patch_embed.proj.bias": (width,)}
    for i in range(layers):  # timm-style Block: norm1, attn.qkv (bias), attn.proj, norm2, mlp.fc1/fc2
        p = f"{vis}blocks.{i}."
        out |= {p + "norm1.weight": (width,), p + "norm1.bias": (width,),
                p + "attn.qkv.weight": (3 * width, width), p + "attn.qkv.bias": (3 * width,),
                p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
                p + "norm2.weight": (width,), p + "norm2.bias": (width,),
                p + "mlp.fc1.weight": (4 * width, width), p + "mlp.fc1.bias": (4 * width,),
                p + "mlp.fc2.weight": (width, 4 * width), p + "mlp.fc2.bias": (width,)}
    out |= {vis + "norm.weight": (width,), vis + "norm.bias": (width,)}
    h, ff = c["hidden_size"], c["intermediate_size"]
    out |= {txt + "embeddings.position_ids": (1, c["max_position_embeddings"]),  # med.py: a persistent buffer
            txt + "embeddings.word_embeddings.weight": (c["vocab_size"], h),
            txt + "embeddings.position_embeddings.weight": (c["max_position_embeddings"], h),
            txt + "embeddings.LayerNorm.weight": (h,), txt + "embeddings.LayerNorm.bias": (h,)}
    for i in range(c["num_hidden_layers"]):  # med.py BertLayer: self-attention, cross-attention to the ViT, FFN
        p = f"{txt}encoder.layer.{i}."
        for att, kv in (("attention", h), ("crossattention", width)):  # cross: key/value read the image's width
            out |= {f"{p}{att}.self.query.weight": (h, h), f"{p}{att}.self.query.bias": (h,),
                    f"{p}{att}.self.key.weight": (h, kv), f"{p}{att}.self.key.bias": (h,),
                    f"{p}{att}.self.value.weight": (h, kv), f"{p}{att}.self.value.bias": (h,),
                    f"{p}{att}.output.dense.weight": (h, h), f"{p}{att}.output.dense.bias": (h,),
                    f"{p}{att}.output.LayerNorm.weight": (h,), f"{p}{att}.output.LayerNorm.bias": (h,)}
        out |= {p + "intermediate.dense.weight": (ff, h), p + "intermediate.dense.bias": (ff,),
                p + "output.dense.weight": (h, ff), p + "output.dense.bias": (h,),
                p + "output.LayerNorm.weight": (h,), p + "output.LayerNorm.bias": (h,)}
    out |= {"blip.vision_proj.weight": (256, width), "blip.vision_proj.bias": (256,),  # BLIP_Pretrain's embed_dim 256
            "blip.text_proj.weight": (256, h), "blip.text_proj.bias": (256,)}
    return out | mlp_head_shapes("mlp.layers.", h)


def _random_fill(tensors, seed: int) -> None:
    """Fill (name, tensor) pairs in place, seeded, as the libraries initialise: LayerNorm weights 1, biases 0,
    logit_scale ln(1/0.07) (CLIP's), integer buffers (position ids) 0..n-1, every other tensor uniform with std 0.02
    (transformers' initializer_range; uniform because it draws twice as fast as normal: ~8 s for ViT-H/14 on a core)."""
    import math
    import re

    g, a = torch.Generator().manual_seed(seed), 0.02 * 3**0.5
    with torch.no_grad():
        for name, t in tensors:
            if not t.is_floating_point():
                t.copy_(torch.arange(t.shape[-1]).expand_as(t))
            elif name.endswith("logit_scale"):
                t.fill_(math.log(1 / 0.07))
            elif name.endswith("bias"):
                t.zero_()
            elif t.ndim == 1 and re.search(r"(norm\w*|ln_\w*|LayerNorm)\.weight$", name):
                t.fill_(1.0)
            else:
                t.uniform_(-a, a, generator=g)


def _random_state(shapes: dict[str, tuple], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A state dict of `shapes`, randomly filled (`_random_fill`) in float32 and stored in `dtype`, one tensor at a
    time (peak memory: the dict in `dtype` plus its largest tensor in float32). position_ids stay int64."""
    state = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.int64 if name.endswith("position_ids") else torch.float32)
        _random_fill([(name, t)], seed + len(state))  # a generator per tensor, seeded by its index
        state[name] = t if not t.is_floating_point() else t.to(dtype)
    return state


def _save_plain(file: Path, obj) -> None:
    """torch.save of a dict of tensors (what the real .pt/.pth are; torch.load(weights_only=True) reads it)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, file)


def _clip_processor(kind: str):
    """The CLIPProcessor (stand-in tokenizer, CLIP's image settings) that `_clip_model_and_processor` gives, alone."""
    with torch.device("meta"):  # the model comes out empty and is dropped
        return _clip_model_and_processor(kind)[1]


def _clip_folder(folder: Path, kind: str, seed: int, processor: bool) -> None:
    """A CLIPModel at CLIP_SHAPES[kind] saved with save_pretrained (float32 safetensors), built on the meta device and
    filled by `_random_fill` (no second pass of transformers' own initialisation over ~1B values); + its processor."""
    with torch.device("meta"):
        model, proc = _clip_model_and_processor(kind)
    model.to_empty(device="cpu")
    _random_fill(itertools.chain(model.named_parameters(), model.named_buffers()), seed)
    model.save_pretrained(folder)
    if processor:
        proc.save_pretrained(folder)


# ---------------------------------------------------------------- command line
@dataclass
class Args:
    out: str
    """folder to write into: <out>/<model>/ for each pipeline, <out>/pickapic/, <out>/imagereward/, <out>/prompts.txt,
    <out>/scorers/"""
    models: tuple[Name, ...] = ("sd15",)
    """pipelines to build (`--models` alone: none)"""
    scorers: tuple[ScorerFile, ...] = ()
    """scorers whose files to write into <out>/scorers/, at the real architectures with random weights (`scorer_files`;
    all five: hps imagereward pickscore aesthetic clip, 9.4 GB); prints evaluate.py's flags for them"""
    seed: int = 0
    """seed of the random weights and the data"""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype the weights are saved in (the published main files: float32)"""
    scale: float = 1.0
    """1: the real shapes; < 1 shrinks widths and depths (only for the quick tests of this file)"""
    data_size: int = 512
    """side of the data's images in pixels (SDXL: 1024)"""
    pairs: int = 8
    """Pick-a-Pic pairs per split"""


def main(args: Args) -> None:
    out = Path(args.out)
    for name in args.models:
        print(f"building {name} -> {pipeline(name, out / name, args.seed, args.dtype, args.scale)}", flush=True)
    pickapic(out / "pickapic", args.pairs, args.data_size, args.seed)
    imagereward(out / "imagereward", size=args.data_size, seed=args.seed)
    (out / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    print(f"data -> {out / 'pickapic'}, {out / 'imagereward'}, {out / 'prompts.txt'}")
    flags = {}
    for name in args.scorers:
        print(f"writing the {name} scorer's files into {out / 'scorers'}", flush=True)
        flags[name] = scorer_files(name, out / "scorers", args.seed)
    if flags:
        print("scorers -> evaluate.py --scorers " + " ".join(flags) + " \\\n    --scorer-paths "
              + " ".join(f"{n}={p}" for n, (p, _) in flags.items()) + " \\\n    --clip-paths "
              + " ".join(f"{n}={c}" for n, (_, c) in flags.items()))


if __name__ == "__main__":
    import tyro

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(tyro.cli(Args))
