"""A reward model of human preferences: an MLP on frozen CLIP image and text embeddings.

Docs (usage, logged metrics, implementation details with sources, toy results, tests): docs/reward_model.md

DPOK's custom reward (Fan et al. 2023, https://arxiv.org/abs/2305.16381) and the reward of Lee et al. 2023
("Aligning Text-to-Image Models using Human Feedback", https://arxiv.org/abs/2302.12192):

    --head dpok:  r_φ(x, z) = σ(MLP_φ([e_T(z), e_I(x)]))                 DPOK's RewardModel (dpok/reward_model.py)
    --head mlp:   r_φ(x, z) = MLP_φ([e_I(x) / |e_I(x)|, e_T(z) / |e_T(z)|])   ours
    e_I, e_T: frozen CLIP ViT-L/14 embeddings (768 + 768); MLP_φ: three Linear(·, 512) + LeakyReLU, then
    Linear(512, 1) (common/scorers.py: RewardMLP). DPOK's head ends in a sigmoid on raw embeddings, so r ∈ (0, 1):
    the scale DPOK's α (10 to 1000) was tuned for, and the scale of Lee et al.'s labels. It is the default with
    --loss binary --label-loss mse (DPOK's custom reward was trained that way). With --loss pairwise the default is
    ours, a departure: a sigmoid caps the Bradley-Terry logit r_w - r_l at ±1 (P(x_w ≻ x_l) ≤ σ(1) = 0.73), and
    our unbounded r has another scale (tens on the toy world): rescale α when DPOK uses it (docs/dpok.md).

--loss pairwise: Bradley–Terry on preference pairs x_w ≻ x_l for a prompt z (ImageRewardDB and/or Pick-a-Pic):

    L_BT(φ) = -E[ y · log σ(r_φ(x_w, z) - r_φ(x_l, z)) + (1 - y) · log σ(r_φ(x_l, z) - r_φ(x_w, z)) ]
    y = 1 for a preference, 0.5 for a tie kept with --keep-ties (PickScore's soft target)

--loss binary: Lee et al.'s good/bad labels y ∈ {0, 1}, plus their auxiliary prompt classification over the true
prompt z_0 = z and n - 1 perturbed prompts z_1..z_{n-1}, on the good images (a bad image may well match a
perturbed prompt better than its own). Lee et al. (Section 3.2), the default (--label-loss mse):

    L(φ) = E[ (y - r_φ(x, z))² ] + λ · E_{y=1}[ -log softmax_i (r_φ(x, z_i) / T)|_{i=0} ]

  --label-loss bce replaces the squared error by the cross-entropy on the logit r,
  -E[ y · log σ(r_φ(x, z)) + (1 - y) · log σ(-r_φ(x, z)) ]. At the optimum both rank images alike: mse makes r
  estimate P(good | x, z), bce its logit, so "good" is predicted by r > 0.5 (mse) or r > 0 (bce).

  Perturbations (`perturb_prompt`): swap two content words of the prompt that share a neighbouring word in the data
  ("a red circle on a white background" -> "a white circle on a red background") or replace one by the vocabulary
  word that shares the most neighbours with it ("a blue circle ...", "a red square ..."): fluent prompts that mean
  something else, so the reward must read colours, objects and their binding from the text, not just rate the image.

Paper symbols -> flags / names: r_φ -> `head` (RewardMLP); x_w, x_l -> `w`, `l`; y -> `y`; n -> --num-prompts;
λ -> --pc-coef; T -> --pc-temperature; e_I, e_T -> rows of the cached embedding tables `img`, `txt`.

CLIP runs once per image and prompt: the embeddings are cached on disk (--cache-dir), keyed by the backbone and the
data, and reused by every epoch and every later run; training the head then takes seconds. Held-out preference
accuracy counts a model tie (r_w == r_l) as an error, as ImageReward's evaluation does, and is reported next to the
zero-shot CLIP score 100 · max(cos(e_I, e_T), 0) on the same pairs. The result loads as a scorer:
`common.scorers.load_scorer("reward-model", "<output-dir>/final")`.

Usage:
    python reward_model.py                                                  # ImageRewardDB train -> test accuracy
    python reward_model.py --dataset imagereward pickapic --dataset-source pickapic=/data/pickapic_v2
    python reward_model.py --loss binary --dataset-source binary=/data/lee2023  # {train,validation}.parquet
    torchrun --nproc_per_node 8 reward_model.py --dataset pickapic --dataset-source pickapic=/data/pickapic_v2
    python reward_model.py --toy                                            # offline toy world, a minute on a CPU
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
import tyro
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from common import kernels
from common.data import (PickapicPairs, data_files, decode_image, has_heldout_split, image_bytes, load_binary,
                         load_pairs)
from common.runtime import (MetricsLogger, absolute, all_reduce_mean, barrier, check_finite, check_resume_args,
                            cleanup_distributed, fingerprint, load_checkpoint, prepare_output_dir, require,
                            save_checkpoint, seed_everything, set_rng_state, setup_distributed, write_args)
from common.scorers import CLIP_L14, ClipBackbone, RewardMLP, clip_pixels, save_reward_model

log = logging.getLogger("reward_model")


@dataclass
class Args:
    loss: Literal["pairwise", "binary"] = "pairwise"
    """pairwise: Bradley-Terry on preference pairs (DPOK, ImageReward, PickScore); binary: Lee et al.'s labels"""
    dataset: tuple[Literal["imagereward", "pickapic"], ...] = ("imagereward",)
    """preference data: trained on with --loss pairwise, held-out accuracy reported for both losses; one or both"""
    dataset_source: tuple[str, ...] = ()
    """NAME=SOURCE (hub id, folder or parquet) per data set: imagereward (default THUDM/ImageRewardDB: metadata-<split>
    .parquet, images/<split>/<split>_N.zip), pickapic (default yuvalkirstain/pickapic_v2, which answers 404 since
    2025: point to a copy), binary (--loss binary, no default: {train,validation}.parquet of prompt, image, label)"""
    imagereward_eval_split: str = "test"
    """held-out ImageRewardDB split: its test set (466 prompts, 6,399 non-tie pairs) is the published benchmark"""
    pickapic_eval_split: str = "test_unique"
    """held-out Pick-a-Pic split: PickScore's 70.5 % is on test_unique"""
    max_broken_fraction: float = 0.01
    """rows with unusable labels or ranks (null, non-numeric, out of range) are skipped and counted up to this
    fraction of a split; above it the run stops, naming the column (common/data.py)"""
    max_pairs: int | None = None
    """use at most this many training pairs per dataset (None: all)"""
    keep_ties: bool = False
    """pairwise: train on tied pairs with target 0.5 (PickScore does; ImageReward skips them). Evaluation drops ties"""
    num_prompts: int = 8
    """binary: n, the true prompt plus n-1 perturbed ones in the prompt-classification term (our choice)"""
    pc_coef: float = 0.5
    """binary: λ, the weight of the prompt-classification term (our choice)"""
    label_loss: Literal["mse", "bce"] = "mse"
    """binary: the label term. mse: Lee et al. 2023's (y − r)²; bce: binary cross-entropy on σ(r)"""
    pc_temperature: float = 1.0
    """binary: T, the softmax temperature of the prompt-classification term, softmax_i r(x, z_i) / T"""
    clip_path: str = CLIP_L14
    """the frozen CLIP backbone (hub id or folder); DPOK uses ViT-L/14"""
    head: Literal["dpok", "mlp"] | None = None
    """dpok: σ(MLP([e_T, e_I])) on raw embeddings, DPOK's; mlp: MLP([e_I/|e_I|, e_T/|e_T|]), ours (None: dpok with
    --loss binary --label-loss mse, DPOK's recipe; mlp otherwise, as a sigmoid caps the Bradley-Terry logit at ±1)"""
    hidden_dim: int = 512
    """width of the MLP's hidden layers (DPOK: 512)"""
    num_hidden_layers: int = 3
    """Linear + LeakyReLU layers before the output layer (DPOK: 3)"""
    steps: int | None = None
    """optimizer steps (None: 10 passes over the training pairs or labelled images, our choice)"""
    per_device_batch: int = 256
    """pairs (or labelled images) per GPU per micro-step; effective batch = per-device batch x GPUs x grad-accum"""
    grad_accum: int = 1
    """micro-steps accumulated per optimizer step"""
    learning_rate: float = 1e-4
    """AdamW learning rate, constant (length, batch and learning rate are our choices, not a published recipe)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    embed_batch_size: int = 64
    """images per CLIP forward while filling the embedding cache (per GPU)"""
    num_workers: int = 4
    """DataLoader workers decoding images for the embedding cache"""
    cache_dir: str = "runs/embedding_cache"
    """where CLIP embeddings are cached, keyed by the backbone's and the data's bytes; shared by runs"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """autocast for the CLIP forward that fills the cache (fp16 needs a GPU); the head trains in float32"""
    compile: bool = False
    """torch.compile the head and the loss (eager is the reference)"""
    output_dir: str | None = None
    """run folder (default runs/reward_model-<timestamp>): args.json, metrics.jsonl, tb/, checkpoints/, final/"""
    resume: bool = False
    """continue from --output-dir's latest checkpoint"""
    overwrite: bool = False
    """start afresh in a non-empty --output-dir, deleting the previous run's outputs (refused without this flag)"""
    checkpoint_every: int = 500
    """optimizer steps between checkpoints (and one at the end)"""
    eval_every: int = 200
    """optimizer steps between held-out evaluations (and one at the end)"""
    log_every: int = 20
    """optimizer steps between training-metric logs"""
    seed: int = 0
    """seeds the head's initialisation, the data order and the prompt perturbations"""
    toy: bool = False
    """run on the offline toy world (tiny CLIP, toy ImageRewardDB / Pick-a-Pic / binary data) with CPU-sized defaults:
    `toy_args()` becomes the command line's defaults"""


# ------------------------------------------------------------------------------------------------ the losses


def pairwise_loss(r_w: torch.Tensor, r_l: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: -mean[ y log σ(r_w - r_l) + (1 - y) log σ(r_l - r_w) ].

    r_w, r_l, y (B,); y = 1 for a preference, 0.5 for a tie. With y = 1 it is -mean log σ(r_w - r_l).
    """
    d = r_w - r_l  # (B,)
    return -(y * F.logsigmoid(d) + (1 - y) * F.logsigmoid(-d)).mean()


def binary_loss(r: torch.Tensor, label: torch.Tensor, pc_coef: float, label_loss: str = "mse",
                temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Lee et al. 2023: mean (y - r(x, z))² + λ · CE(softmax_i (r(x, z_i) / T), 0) over the good images (y = 1).

    r (B, n): column 0 scores the true prompt, columns 1..n-1 the perturbed ones; label (B,) in {0, 1}.
    label_loss "mse": the paper's squared error (y - r)²; "bce": the binary cross-entropy of σ(r) against y.
    Returns (loss, label_term, prompt_ce); the prompt term averages over the good images (0 if the batch has none).
    """
    if label_loss == "mse":
        label_term = (label - r[:, 0]).square().mean()
    else:
        label_term = F.binary_cross_entropy_with_logits(r[:, 0], label)
    ce = -F.log_softmax(r / temperature, dim=1)[:, 0]  # (B,) -log P(true prompt | x)
    prompt_ce = (ce * label).sum() / label.sum().clamp(min=1)  # no host sync: a good-free batch gives 0, not NaN
    return label_term + pc_coef * prompt_ce, label_term, prompt_ce


def label_threshold(label_loss: str) -> float:
    """The reward above which an image is predicted good: 0.5 for mse (r estimates P(good)), 0 for bce (its logit)."""
    return 0.5 if label_loss == "mse" else 0.0


def preference_accuracy(r_w: torch.Tensor, r_l: torch.Tensor) -> float:
    """Fraction of pairs with r_w > r_l strictly: a model tie counts as an error (ImageReward's evaluation)."""
    return (r_w > r_l).float().mean().item()


# ------------------------------------------------------------------------------------------------ small helpers

STOPWORDS = frozenset("a an the of on in with and or at to by for from is are its it this that as into".split())


def content_words(prompt: str) -> list[tuple[int, str]]:
    """(position, lowercased word) of the prompt's words outside STOPWORDS, split on whitespace."""
    words = [re.sub(r"[^\w-]", "", w.lower()) for w in prompt.split()]
    return [(i, w) for i, w in enumerate(words) if w and w not in STOPWORDS and not w.isdigit()]


def substitutes(prompts: list[str]) -> dict[str, Counter]:
    """Each content word of the data -> how many neighbours (left or right word) it shares with each other content
    word. Words seen in the same places play the same role: in the toy data "red" shares 3 with blue, green and
    yellow (all sit between "a" and "circle"/"square") and 1 with white ("a white background"); "circle" shares 5
    with square. Exchanging such words makes a fluent prompt that means something else: a hard negative."""
    contexts: dict[str, set[str]] = defaultdict(set)
    for p in prompts:
        words = [re.sub(r"[^\w-]", "", w.lower()) for w in p.split()]
        for i, w in content_words(p):
            contexts[w] |= {f"L:{words[i - 1] if i else '<s>'}", f"R:{words[i + 1] if i + 1 < len(words) else '</s>'}"}
    by_context: dict[str, set[str]] = defaultdict(set)
    for w, cs in contexts.items():
        for c in cs:
            by_context[c].add(w)
    return {w: Counter(v for c in cs for v in by_context[c] if v != w) for w, cs in contexts.items()}


def perturb_prompt(prompt: str, subs: dict[str, Counter], n: int, seed: int) -> list[str]:
    """n prompts unlike `prompt`: each either swaps two of its content words that share a neighbour ("a red circle
    on a white background" -> "a white circle on a red background") or replaces one by a word sharing the most
    neighbours with it ("a blue circle ..."; any word of the vocabulary if no word of the prompt has one).
    Deterministic in (seed, prompt); distinct where the data allow, else the last one repeats."""
    rng = random.Random(f"{seed}/{prompt}")
    tokens, slots = prompt.split(), content_words(prompt)
    best = {w: sorted(v for v, k in subs.get(w, Counter()).items() if k == max(subs[w].values())) for _, w in slots}
    replaceable = [(i, w) for i, w in slots if best[w]] or slots
    swappable = [(a, b) for a in slots for b in slots if a[0] < b[0] and subs.get(a[1], Counter())[b[1]] > 0]
    out: list[str] = []
    for _ in range(50 * n):
        if len(out) == n or not slots:
            break
        new = list(tokens)
        if swappable and rng.random() < 0.5:
            (i, _), (j, _) = rng.choice(swappable)
            new[i], new[j] = tokens[j], tokens[i]
        else:
            i, w = rng.choice(replaceable)
            new[i] = rng.choice(best[w] or sorted(subs))
        candidate = " ".join(new)
        if candidate.lower() != prompt.lower() and candidate not in out:
            out.append(candidate)
    return (out + [out[-1] if out else prompt + " ."] * n)[:n]


@functools.cache
def clip_backbone(path: str, device: str, key: str) -> ClipBackbone:
    """Loaded only when the cache misses; kept per process under the weights' `key` (fingerprint), not the path, so
    weights replaced in the same folder are loaded again."""
    return ClipBackbone(path).to(device)


class ImageItems(torch.utils.data.Dataset):
    """Item k of `rows` -> per image field: (blake2b of its bytes, CLIP-preprocessed pixels), or None if it does not
    decode. Runs in DataLoader workers; the hash lets the main process embed each distinct image once."""

    def __init__(self, rows, fields: tuple[str, ...], backbone: ClipBackbone):
        self.rows, self.fields = rows, fields
        self.prep = (backbone.size, backbone.crop, backbone.mean.cpu(), backbone.std.cpu())

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        row, out = self.rows[k], []
        for f in self.fields:
            try:
                data = image_bytes(row[f] if isinstance(row, dict) else getattr(row, f))
                x = torch.from_numpy(np.asarray(decode_image(data).convert("RGB"), dtype=np.float32) / 255.0)
            except Exception as e:  # a broken image skips its item (pair or row); counted and logged below
                log.warning("item %d, %s: undecodable image skipped (%s: %s)", k, f, type(e).__name__, e)
                return k, None
            pixels = clip_pixels(x.permute(2, 0, 1)[None], *self.prep)[0]  # (3, h, w), as the scorer sees it
            out.append((hashlib.blake2b(data, digest_size=16).hexdigest(), pixels))
        return k, out


def embed_shard(rows, fields, backbone: ClipBackbone, ks: range, args: Args, dist) -> dict[str, torch.Tensor]:
    """CLIP image embeddings of items `ks` of `rows`: a table of the distinct images (M, D) and an index
    (len(ks), F) into it, -1 for an item with a broken image."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ImageItems(rows, fields, backbone), ks),
                                         batch_size=args.embed_batch_size, num_workers=args.num_workers,
                                         collate_fn=list)
    seen, chunks, index = {}, [], torch.full((len(ks), len(fields)), -1, dtype=torch.long)
    pos = {k: p for p, k in enumerate(ks)}
    device = dist.device
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16,
                         enabled=args.mixed_precision != "no")
    for batch in tqdm(loader, desc="CLIP image embeddings", disable=not dist.is_main):
        new = []
        for k, images in batch:
            for f, (digest, pixels) in enumerate(images or []):
                if digest not in seen:
                    seen[digest] = len(seen)
                    new.append(pixels)
                index[pos[k], f] = seen[digest]
        if new:
            with torch.no_grad(), amp:
                chunks.append(backbone.embed_pixels(torch.stack(new).to(device)).float().cpu())
    table = torch.cat(chunks) if chunks else torch.zeros(0, backbone.embed_dim)
    return {"table": table, "index": index}


def stored_key(path: Path) -> str | None:
    """The key an embedding cache file was written under (None for a file written before keys were stored)."""
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("key")


def cached(kind: str, key: dict, n: int, embed, args: Args, dist) -> dict[str, torch.Tensor]:
    """The cache file for `key`, or: every rank embeds its contiguous shard of the n items (`embed(range) -> {table,
    index}`), rank 0 merges the parts into one file, and all read it. Keys hash the backbone's and the data's bytes
    (common.runtime.fingerprint: a file changed in place, even with its size and mtime kept, re-embeds); the key is
    stored in the file and compared on reuse."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(args.cache_dir) / f"{kind}-{digest}.safetensors"
    if path.exists() and stored_key(path) == json.dumps(key, sort_keys=True):
        print(f"embedding cache hit: {path} ({kind}, {n} items)") if dist.is_main else None
    else:
        print(f"embedding {n} {kind} items with {args.clip_path} -> {path}") if dist.is_main else None
        path.parent.mkdir(parents=True, exist_ok=True)
        # Contiguous shards: a prompt's images sit together (ImageRewardDB), so each rank's de-duplication still bites.
        lo, hi = dist.rank * n // dist.world_size, (dist.rank + 1) * n // dist.world_size
        save_file(embed(range(lo, hi)), str(path.with_suffix(f".part{dist.rank}")))
        barrier()
        if dist.is_main:
            parts = [load_file(str(path.with_suffix(f".part{r}"))) for r in range(dist.world_size)]
            offsets = np.cumsum([0] + [len(p["table"]) for p in parts])  # shift each part's rows past the earlier ones
            index = torch.cat([torch.where(p["index"] >= 0, p["index"] + int(o), -1) for p, o in zip(parts, offsets)])
            tmp = path.with_suffix(".tmp")
            save_file({"table": torch.cat([p["table"] for p in parts]), "index": index}, str(tmp),
                      metadata={"key": json.dumps(key, sort_keys=True)})
            os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache that a later run trusts
            for r in range(dist.world_size):
                path.with_suffix(f".part{r}").unlink()
        barrier()
    return load_file(str(path))


def text_table(texts: list[str], args: Args, dist, device) -> torch.Tensor:
    """CLIP text embeddings (len(texts), D) of distinct strings, through the cache."""
    def embed(ks: range) -> dict[str, torch.Tensor]:
        backbone = clip_backbone(args.clip_path, str(device), fingerprint(args.clip_path))
        chunk = [texts[k] for k in ks]
        with torch.no_grad():
            rows = [backbone.embed_texts(chunk[i : i + 256]).cpu() for i in range(0, len(chunk), 256)]
        table = torch.cat(rows) if rows else torch.zeros(0, backbone.embed_dim)
        return {"table": table, "index": torch.arange(len(chunk))[:, None]}

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    key = dict(kind="texts", clip=fingerprint(args.clip_path, dist=dist), texts=digest)
    c = cached("texts", key, len(texts), embed, args, dist)
    return c["table"][c["index"][:, 0]]


def image_embeddings(name: str, rows, fields: tuple[str, ...], source: str, split: str, extra: dict, args: Args,
                     dist, device) -> dict[str, torch.Tensor]:
    def embed(ks: range):
        backbone = clip_backbone(args.clip_path, str(device), fingerprint(args.clip_path))
        return embed_shard(rows, fields, backbone, ks, args, dist)

    key = dict(kind="images", clip=fingerprint(args.clip_path, dist=dist), data=name, split=split,
               source=fingerprint(*data_files(name, source, split), dist=dist),  # the split's bytes
               n=len(rows), fields=fields, **extra)
    return cached(f"{name}-{split}", key, len(rows), embed, args, dist)


def pair_set(name: str, split: str, args: Args, dist, device, train: bool) -> dict[str, torch.Tensor]:
    """Embedded preference pairs: img table, w/l/t indices (P,), y targets (P,); pairs with a broken image dropped."""
    source = dataset_sources(args)[name]
    keep_ties = args.keep_ties and train
    max_pairs = args.max_pairs if train else None
    pairs = load_pairs(name, source, split, keep_ties=keep_ties, max_pairs=max_pairs,
                       max_broken=args.max_broken_fraction)
    if isinstance(pairs, PickapicPairs):  # read the caption column alone: a row also holds two encoded images
        captions, ties = pairs.ds.select_columns(["caption"])[pairs.rows.tolist()]["caption"], pairs.tie.tolist()
    else:
        captions, ties = [p.caption for p in pairs], [p.tie for p in pairs]
    require(len(pairs) > 0, f"{name} {split}: no pairs")
    c = image_embeddings(name, pairs, ("image_w", "image_l"), source, split, dict(ties=keep_ties, max=max_pairs),
                         args, dist, device)
    texts = sorted(set(captions))
    ids = {s: i for i, s in enumerate(texts)}
    t = torch.tensor([ids[s] for s in captions])  # (P,) row of each pair's caption in the text table
    ok = (c["index"] >= 0).all(1)
    if not ok.all():
        print(f"{name} {split}: skipped {int((~ok).sum())} of {len(pairs)} pairs with an undecodable image")
    y = 1.0 - 0.5 * torch.tensor(ties, dtype=torch.float32)  # 1 for a preference, 0.5 for a tie
    return dict(img=c["table"], w=c["index"][ok, 0], l=c["index"][ok, 1], txt=text_table(texts, args, dist, device),
                t=t[ok], y=y[ok])


def binary_set(split: str, subs: dict[str, Counter] | None, args: Args, dist, device) -> tuple[dict, dict]:
    """Embedded labelled images: img table, i (R,), label (R,), t (R, n) text ids, column 0 the true prompt; and the
    word substitutes of the perturbed prompts (`subs`, or, if None, those of this split's prompts)."""
    ds = load_binary(dataset_sources(args)["binary"], split, max_broken=args.max_broken_fraction)
    table = ds.select_columns(["prompt", "label"]).to_dict()
    subs = substitutes(sorted(set(table["prompt"]))) if subs is None else subs
    c = image_embeddings("binary", ds, ("image",), dataset_sources(args)["binary"], split, {}, args, dist, device)
    prompts = sorted(set(table["prompt"]))
    options = {p: [p] + perturb_prompt(p, subs, args.num_prompts - 1, args.seed) for p in prompts}
    texts = sorted({s for opts in options.values() for s in opts})
    ids = {s: i for i, s in enumerate(texts)}
    t = torch.tensor([[ids[s] for s in options[p]] for p in table["prompt"]])  # (R, n)
    ok = c["index"][:, 0] >= 0
    label = torch.tensor(table["label"], dtype=torch.float32)
    require(bool(((label == 0) | (label == 1)).all()), f"{dataset_sources(args)['binary']} {split}: labels must be 0 or 1")
    if not ok.all():
        print(f"binary {split}: skipped {int((~ok).sum())} of {len(ok)} undecodable images")
    txt = text_table(texts, args, dist, device)
    return dict(img=c["table"], i=c["index"][ok, 0], label=label[ok], txt=txt, t=t[ok]), subs


@torch.no_grad()
def evaluate(head: RewardMLP, eval_sets: dict, binary_val: dict | None, threshold: float = 0.0) -> dict[str, float]:
    metrics = {}
    for name, s in eval_sets.items():
        r_w, r_l = head(s["img"][s["w"]], s["txt"][s["t"]]), head(s["img"][s["l"]], s["txt"][s["t"]])
        metrics[f"eval/{name}_accuracy"] = preference_accuracy(r_w, r_l)
        cos = lambda i: F.cosine_similarity(s["img"][i], s["txt"][s["t"]], dim=-1)  # noqa: E731
        metrics[f"eval/{name}_clip_score_accuracy"] = preference_accuracy(100 * cos(s["w"]).clamp(min=0),
                                                                          100 * cos(s["l"]).clamp(min=0))
    if binary_val is not None:
        b = binary_val
        r = head(b["img"][b["i"]][:, None].expand(-1, b["t"].shape[1], -1), b["txt"][b["t"]])  # (R, n)
        metrics["eval/binary_accuracy"] = ((r[:, 0] > threshold).float() == b["label"]).float().mean().item()
        good = b["label"] == 1
        metrics["eval/prompt_accuracy"] = (r[good].argmax(1) == 0).float().mean().item()  # true prompt ranked first
    return metrics


# ------------------------------------------------------------------------------------------------ main


def toy_args(**overrides) -> Args:
    """Args for the offline toy world (tiny CLIP, toy ImageRewardDB / Pick-a-Pic / binary data), CPU-sized.
    `--toy` makes these the defaults of the command line, so flags given explicitly still win."""
    from common.toy import toy_world

    world = toy_world()
    toy = dict(toy=True, clip_path=str(world.clip), pickapic_eval_split="test", per_device_batch=64, learning_rate=1e-3, num_workers=0, eval_every=100, checkpoint_every=200)
    return dataclasses.replace(Args(), **{**toy, **overrides})


DEFAULT_EPOCHS = 10  # --steps None: ten passes over the training data (our choice)
HUB_SOURCES = {"imagereward": "THUDM/ImageRewardDB", "pickapic": "yuvalkirstain/pickapic_v2"}


def dataset_sources(args: Args) -> dict[str, str]:
    """Each data set's source: the hub default (the toy world's copy with --toy), overridden by --dataset-source
    NAME=SOURCE, so naming one source keeps the others."""
    if args.toy:
        from common.toy import toy_world

        world = toy_world()
        defaults = dict(imagereward=str(world.imagereward), pickapic=str(world.pickapic), binary=str(world.binary))
    else:
        defaults = {**HUB_SOURCES, "binary": ""}
    return {**defaults, **dict(spec.split("=", 1) for spec in args.dataset_source)}


def main(args: Args) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    head_form = args.head or ("dpok" if args.loss == "binary" and args.label_loss == "mse" else "mlp")
    require(not (head_form == "dpok" and args.loss == "binary" and args.label_loss == "bce"),
            "--head dpok with --label-loss bce: the head already ends in a sigmoid; use --label-loss mse or --head mlp")
    require(len(args.dataset) > 0 and len(set(args.dataset)) == len(args.dataset),
            f"--dataset: one or more distinct of imagereward, pickapic (got {args.dataset})")
    for spec in args.dataset_source:
        require(spec.partition("=")[0] in ("imagereward", "pickapic", "binary") and "=" in spec,
                f"--dataset-source {spec!r}: expected NAME=SOURCE with NAME imagereward, pickapic or binary")
    require(args.loss != "binary" or dataset_sources(args)["binary"] != "",
            "--loss binary needs --dataset-source binary=SOURCE ({train,validation}.parquet of prompt, image, label)")
    require(args.num_prompts >= 2 and args.pc_coef >= 0 and args.pc_temperature > 0,
            "--num-prompts must be >= 2, --pc-coef >= 0 and --pc-temperature > 0")
    require((args.steps is None or args.steps >= 1) and args.per_device_batch >= 1 and args.grad_accum >= 1,
            "--steps, --per-device-batch and --grad-accum must be >= 1")
    require(args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}")
    require(not args.resume or args.output_dir is not None, "--resume needs --output-dir (the run to continue)")
    dist = setup_distributed()
    device = dist.device
    require(args.mixed_precision != "fp16" or device.type == "cuda",
            "--mixed-precision fp16 needs a GPU; use bf16 or no")
    out = [args.output_dir or f"runs/reward_model-{time.strftime('%Y%m%d-%H%M%S')}"]
    if tdist.is_initialized():
        tdist.broadcast_object_list(out, src=0)  # one folder for all ranks, even if their clocks tick apart
    args = dataclasses.replace(args, output_dir=out[0])
    require(0 <= args.max_broken_fraction < 1,
            f"--max-broken-fraction must be in [0, 1), got {args.max_broken_fraction}")
    prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite, is_main=dist.is_main)
    seed_everything(args.seed, dist.rank)

    # ---- data: CLIP embeddings, computed once and cached (this is where the GPU time goes, once per data set)
    eval_splits = dict(imagereward=args.imagereward_eval_split, pickapic=args.pickapic_eval_split)
    sources = dataset_sources(args)
    eval_sets = {}  # a single parquet file is one split: its "held-out" pairs would be the training pairs
    for name in args.dataset:
        if has_heldout_split(sources[name]):
            eval_sets[name] = pair_set(name, eval_splits[name], args, dist, device, train=False)
        elif dist.is_main:
            print(f"--dataset-source {name}={sources[name]} is a single parquet file, so it has no held-out split: "
                  f"no held-out {name} accuracy (point to a folder with train and {eval_splits[name]} splits)")
    if args.loss == "pairwise":
        sets = [pair_set(name, "train", args, dist, device, train=True) for name in args.dataset]
        offset = np.cumsum([0] + [len(s["img"]) for s in sets])  # stack the datasets' tables, shift their indices
        toffset = np.cumsum([0] + [len(s["txt"]) for s in sets])
        train = dict(img=torch.cat([s["img"] for s in sets]), txt=torch.cat([s["txt"] for s in sets]),
                     w=torch.cat([s["w"] + o for s, o in zip(sets, offset)]),
                     l=torch.cat([s["l"] + o for s, o in zip(sets, offset)]),
                     t=torch.cat([s["t"] + o for s, o in zip(sets, toffset)]), y=torch.cat([s["y"] for s in sets]))
        n_train, binary_val = len(train["w"]), None
    else:
        train, subs = binary_set("train", None, args, dist, device)  # perturbations from the training prompts
        binary_val = None
        if has_heldout_split(dataset_sources(args)["binary"]):
            binary_val = binary_set("validation", subs, args, dist, device)[0]
        elif dist.is_main:
            print(f"--dataset-source binary={sources['binary']} is a single parquet file, so it has no validation split: "
                  "no held-out binary accuracy")
        n_train = len(train["i"])
    clip_backbone.cache_clear()  # CLIP's work is done (if it ran at all): free its memory before training
    train = {k: v.to(device) for k, v in train.items()}
    eval_sets = {name: {k: v.to(device) for k, v in s.items()} for name, s in eval_sets.items()}
    binary_val = {k: v.to(device) for k, v in binary_val.items()} if binary_val is not None else None
    embed_dim = train["img"].shape[1]

    # ---- the run's arithmetic
    per_step = args.per_device_batch * dist.world_size * args.grad_accum  # effective batch
    steps_per_epoch = n_train // per_step  # the last partial batch of an epoch is dropped, identically on every rank
    total_steps = args.steps or DEFAULT_EPOCHS * steps_per_epoch
    require(steps_per_epoch >= 1, f"--per-device-batch {args.per_device_batch} x {dist.world_size} GPUs x --grad-accum "
                                  f"{args.grad_accum} = {per_step} exceeds the {n_train} training items")
    unit = "pairs" if args.loss == "pairwise" else "labelled images"
    say = print if dist.is_main else (lambda *_: None)
    say(f"{n_train} training {unit}; effective batch {args.per_device_batch} x {dist.world_size} GPUs x "
        f"{args.grad_accum} accumulation = {per_step}; {total_steps} steps = {total_steps / steps_per_epoch:.2f} "
        f"epochs of {steps_per_epoch} steps ({total_steps * per_step} {unit} seen); learning rate "
        f"{args.learning_rate}; CLIP embedding dim {embed_dim}")

    # ---- the head, optimizer and resumption
    # Seed again here: filling the cache draws from the global RNG (DataLoader seeds), a cache hit does not, and
    # the head's initialisation must not depend on which happened.
    seed_everything(args.seed, dist.rank)
    head = RewardMLP(embed_dim, args.hidden_dim, args.num_hidden_layers, head_form).to(device)
    model = torch.nn.parallel.DistributedDataParallel(head) if dist.world_size > 1 else head
    forward = torch.compile(model) if args.compile else model
    loss_fn = kernels.compiled(pairwise_loss if args.loss == "pairwise" else binary_loss, args.compile)
    threshold = label_threshold(args.label_loss)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    start = 0
    if args.resume:
        start, weights, extra = load_checkpoint(args.output_dir, script="reward_model.py")
        check_resume_args(extra["args"], args)
        require((extra["n_train"], extra["per_step"]) == (n_train, per_step),
                f"--resume: the checkpoint ran {extra['per_step']} items per step over {extra['n_train']}; this run "
                f"has {per_step} over {n_train}, so the data order would not continue (same flags and GPU count)")
        head.load_state_dict(weights["head"])
        optimizer.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"][dist.rank])
        say(f"resumed from step {start}")
    if dist.is_main:
        write_args(args.output_dir, args)
    logger = MetricsLogger(args.output_dir, enabled=dist.is_main, resume_step=start if args.resume else None)
    config = dict(clip=args.clip_path, embed_dim=embed_dim, hidden_dim=args.hidden_dim, head=head_form,
                  num_hidden_layers=args.num_hidden_layers, loss=args.loss, dataset=list(args.dataset),
                  **(dict(label_loss=args.label_loss) if args.loss == "binary" else {}))
    clip_acc = {k: v for k, v in evaluate(head, eval_sets, None).items() if "clip_score" in k}
    say("zero-shot CLIP score held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in clip_acc.items()))

    # ---- training: the head on cached embeddings; every rank takes its slice of the same global batch
    metrics, n_summed, t0 = {}, 0, time.time()
    for step in tqdm(range(start, total_steps), initial=start, total=total_steps, disable=not dist.is_main):
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        idx = perm[i * per_step : (i + 1) * per_step].view(args.grad_accum, dist.world_size, args.per_device_batch)
        for a in range(args.grad_accum):
            ids = idx[a, dist.rank].to(device)  # (B,)
            sync = nullcontext() if a == args.grad_accum - 1 or dist.world_size == 1 else model.no_sync()
            with sync:
                if args.loss == "pairwise":
                    e_t = train["txt"][train["t"][ids]]  # (B, D)
                    r = forward(train["img"][torch.cat([train["w"][ids], train["l"][ids]])], torch.cat([e_t, e_t]))
                    r_w, r_l = r.chunk(2)  # (B,), (B,): one forward, so DDP sees one call per backward
                    loss = loss_fn(r_w, r_l, train["y"][ids])
                    parts = {"losses/bt": loss, "charts/train_accuracy": (r_w > r_l).float().mean()}
                else:
                    t = train["t"][ids]  # (B, n)
                    r = forward(train["img"][train["i"][ids]][:, None].expand(-1, t.shape[1], -1), train["txt"][t])
                    loss, label_term, pc = loss_fn(r, train["label"][ids], args.pc_coef, args.label_loss,
                                                   args.pc_temperature)  # r (B, n)
                    good = (r[:, 0] > threshold).float()
                    parts = {"losses/label": label_term, "losses/prompt_ce": pc,
                             "charts/train_accuracy": (good == train["label"][ids]).float().mean()}
                (loss / args.grad_accum).backward()
            for k, v in {"losses/loss": loss, **parts}.items():  # summed on device: no host sync per step
                metrics[k] = metrics.get(k, 0.0) + v.detach()
            n_summed += 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done % args.checkpoint_every == 0 or done == total_steps:
            metrics = {k: all_reduce_mean(v / n_summed, dist) for k, v in metrics.items()}
            check_finite(metrics["losses/loss"], done, args.output_dir)  # before any checkpoint can hold a NaN
            logger.log({**metrics, "charts/learning_rate": args.learning_rate, "charts/epoch": done / steps_per_epoch,
                        "charts/items_per_second": per_step * (done - start) / (time.time() - t0)}, done)
            metrics, n_summed = {}, 0
        if done % args.eval_every == 0 or done == total_steps:
            result = evaluate(head, eval_sets, binary_val, threshold)  # same weights on every rank; rank 0 logs
            logger.log(result, done)
            say(f"step {done}/{total_steps}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in result.items()))
        if done % args.checkpoint_every == 0 or done == total_steps:
            save_checkpoint(args.output_dir, done, {"head": head.state_dict()},
                            {"optimizer": optimizer.state_dict(), "args": args, "config": config,
                             "n_train": n_train, "per_step": per_step}, script="reward_model.py")

    # ---- the result: a folder `load_scorer("reward-model", ...)` reads, and the held-out figures
    result = evaluate(head, eval_sets, binary_val, threshold)
    if dist.is_main:
        final = Path(args.output_dir) / "final"
        save_reward_model(final, head, config)
        (Path(args.output_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        print(", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in result.items()))
        repo = Path(__file__).resolve().parent  # so the line works when pasted anywhere, not only in this folder
        print(f'load it with:\n    import sys; sys.path.insert(0, "{repo}"); from common.scorers import load_scorer; '
              f'scorer = load_scorer("reward-model", "{absolute(final)}")')
    logger.close()
    cleanup_distributed()
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, default=toy_args() if "--toy" in sys.argv[1:] else None))
