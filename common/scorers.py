"""Image scorers every script shares: one interface, images + prompts -> one score per image.

    scorer = load_scorer("pickscore", device="cuda", dtype=torch.float16)
    scores = scorer(images, prompts)   # images (N, 3, H, W) float in [0, 1], any H, W; N prompts -> (N,) float32

name          score s(x, z); e_I = E_I(x), e_T = E_T(z) the CLIP image / text embeddings  default weights
toy           fraction of pixels in the prompt's object colour (common/toy.py)            -
clip          100 · max(cos(e_I, e_T), 0), per image                                      openai/clip-vit-large-patch14
clip-raw      100 · cos(e_I, e_T), no clamp (torchmetrics' per-image value)               openai/clip-vit-large-patch14
pickscore     exp(logit_scale) · cos(e_I, e_T)                                            yuvalkirstain/PickScore_v1
hps           100 · cos(e_I, e_T) of HPS v2.1's fine-tuned OpenCLIP ViT-H/14              xswu/HPSv2 (HPS_v2.1_compressed.pt)
imagereward   (MLP(BLIP_ITM(x, z)[CLS]) - μ) / σ, ImageReward v1.0                          THUDM/ImageReward (ImageReward.pt)
aesthetic     MLP(e_I / |e_I|), the LAION improved-aesthetic-predictor head               a file you supply
reward-model  a head on [e_I, e_T] trained by reward_model.py (`RewardMLP`, two forms)    a folder it wrote

- CLIP score: we report Hessel et al. 2021's per-image form (https://arxiv.org/abs/2104.08718: w · max(cos, 0) for
  each image, then the mean over images) with torchmetrics' w = 100 (Hessel et al. use w = 2.5). torchmetrics'
  `CLIPScore` instead clamps the mean: max(mean(100 · cos), 0). The two agree whenever no image has cos < 0 (the
  usual case for generated images and their prompts); `clip-raw` gives 100 · cos per image and
  `torchmetrics_clip_score` turns those into torchmetrics' number when a table needs it.
- PickScore (Kirstain et al. 2023, https://arxiv.org/abs/2305.01569): a CLIP-H/14 fine-tuned on Pick-a-Pic, used
  with the `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` processor, as the model card does.
- HPS v2.1 (Wu et al. 2023, https://arxiv.org/abs/2306.09341, github.com/tgxs002/HPSv2): an OpenCLIP ViT-H/14
  fine-tuned on HPD v2; `hpsv2.score` returns cos(e_I, e_T) (e.g. 0.2707); papers print it x 100 (Diffusion-DPO's
  27.07), which is what we return. The checkpoint is an OpenCLIP state dict (`{"state_dict": ...}`); we load it
  into transformers' CLIPModel through `openclip_to_transformers` (a key map: OpenCLIP's names follow OpenAI
  CLIP's layout) rather than depend on open_clip_torch, which would add timm and ftfy to our pins for one forward
  pass that transformers already implements. Tokenizer: the laion ViT-H/14 one (OpenCLIP's BPE). Pre-processing: HPS's
  own (`hps_pixels`: the long side resized to 224, black pad to square; img_score.py's light_augmentation=True).
- ImageReward (Xu et al. 2023, https://arxiv.org/abs/2304.05977, github.com/THUDM/ImageReward, DPOK's reward):
  BLIP's ViT-L/16 at 224 px encodes the image; BLIP's BERT-base text encoder reads the prompt (BLIP's BERT
  tokenizer, padded/truncated to 35 tokens, [CLS] first: `ImageReward.score` does not swap in BLIP's [ENC] token)
  with cross-attention to all image tokens; its first output token goes through a 768 -> 1024 -> 128 -> 64 -> 16
  -> 1 linear stack (no activations), standardised with μ = 0.16717362830052426, σ = 1.0333394966054072.
  `ImageReward.pt` (a plain state dict, `blip.*` and `mlp.*` keys) loads with torch.load(weights_only=True) and
  maps onto transformers' BlipVisionModel + BlipTextModel (`imagereward_to_transformers`); the `image-reward`
  package pins old transformers/timm, so we do not depend on it.
- LAION aesthetic (github.com/christophschuhmann/improved-aesthetic-predictor): weights
  `sac+logos+ava1-l14-linearMSE.pth` (a plain state dict: `torch.load(weights_only=True)` reads it) or a
  .safetensors conversion, on CLIP ViT-L/14.
- Reward model: `reward_model.py` writes `model.safetensors` + `config.json` (which CLIP it was trained on, and
  which head: DPOK's sigmoid head or our linear one, see `RewardMLP`).

Every scorer is an `nn.Module` in eval mode with frozen weights, batched internally, and differentiable with
respect to the pixels: resizing, cropping or padding and normalising happen in torch (`clip_pixels` with PIL's
clamped two-pass bicubic, `hps_pixels`), never through PIL. Evaluation callers wrap the call in `torch.no_grad()`;
reward backpropagation (DRaFT, AlignProp, ReFL) calls `differentiable_score(scorer, images, prompts)`, which returns
the same values with a graph back to the pixels. `load_scorer(..., feedback=True)` gives Diffusion-DPO's
AI-feedback choice models. torch + transformers only; never `trust_remote_code`, never pickle.
"""

import itertools
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]

CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS = "xswu/HPSv2"  # holds HPS_v2.1_compressed.pt (and v2.0's HPS_v2_compressed.pt)
HPS_FILE = "HPS_v2.1_compressed.pt"
HPS_V2_0_FILE = "HPS_v2_compressed.pt"  # HPS v2.0: Diffusion-DPO's AI-feedback choice model (utils/hps_utils.py)
# OpenCLIP ViT-H/14 laion2B-s32B-b79K in transformers' format (the same weights): Diffusion-DPO's `clip` choice model
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
IMAGEREWARD = "THUDM/ImageReward"  # holds ImageReward.pt and med_config.json
BERT_BASE = "bert-base-uncased"  # BLIP's tokenizer, to which BLIP adds [DEC] and [ENC]
# ImageReward/ImageReward.py: the score is standardised with these, and images normalised with CLIP's constants.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------------ CLIP in torch


def clip_pixels(images: torch.Tensor, size: dict, crop: tuple[int, int] | None, mean: torch.Tensor,
                std: torch.Tensor, round_crop: bool = False) -> torch.Tensor:
    """CLIP's image preprocessing in torch, so gradients reach the pixels: (N, 3, H, W) in [0, 1] -> normalised.

    size {"shortest_edge": s} scales the shorter side to s (the longer to int(s · long / short), as transformers'
    `get_resize_output_image_size`); {"height", "width"} resizes to that. Bicubic with antialiasing, as the
    processor's PIL/torchvision path. Then a centre crop (top = (H - h) // 2, as transformers; round_crop: top =
    round((H - h) / 2), as torchvision's CenterCrop, which ImageReward uses) and (x - mean) / std.
    The resize is PIL's, as the reference pipelines run it on an 8-bit PIL image (ImageReward's _transform, the CLIP
    processors of the PickScore and aesthetic code): `pil_bicubic`, two passes clamped to [0, 1].
    """
    h, w = images.shape[-2:]
    if size.get("shortest_edge"):
        s = size["shortest_edge"]
        new = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    else:
        new = (size["height"], size["width"])
    if new != (h, w):  # skip when already there, so an image at the model's size passes unchanged
        images = pil_bicubic(images, new)
    if crop is not None:
        (h, w), (ch, cw) = images.shape[-2:], crop
        if ch > h or cw > w:
            raise ValueError(f"crop {crop} is larger than the resized image {(h, w)}")
        top, left = (round((h - ch) / 2), round((w - cw) / 2)) if round_crop else ((h - ch) // 2, (w - cw) // 2)
        images = images[..., top : top + ch, left : left + cw]
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def pil_bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's `Image.resize(size, BICUBIC)` of an 8-bit image, in torch and differentiable: (N, C, H, W) -> (N, C, h, w).

    PIL resamples in two passes, the width first, each into an 8-bit image, so each pass's result is rounded and
    clamped to [0, 255]; its kernel is the antialiased bicubic (a = -0.5, support scaled by the downscale factor) that
    torch's antialias=True implements. We do the two passes with the clamp to [0, 1] between and after (bicubic
    overshoots at sharp edges by up to about 10 % of the range, which PIL saturates) and leave out the rounding (no
    gradient): on an 8-bit input the result is within 1/255 of PIL's per pixel (tests/test_scorers.py).
    """
    h, w = images.shape[-2:]
    if w != size[1]:  # PIL skips a pass whose side is unchanged
        images = F.interpolate(images, size=(h, size[1]), mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0, 1)
    if h != size[0]:
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return images


def hps_pixels(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """HPS v2's image preprocessing in torch: (N, 3, H, W) in [0, 1] -> (N, 3, size, size) normalised.

    HPS v2 (img_score.py: create_model_and_transforms(..., light_augmentation=True) -> image_transform(...,
    resize_longest_max=True, fill_color=0)) does ToTensor, then open_clip's `ResizeMaxSize`: scale = size / max(H, W),
    the image resized to (round(H · scale), round(W · scale)) by torchvision's tensor `resize` (bicubic; antialiased,
    torchvision's default for tensors since 0.17; on floats, so no clamp), then padded with 0 (black, before the
    normalisation) to size × size, left/top pad // 2 and right/bottom the rest; then Normalize(OpenAI CLIP's mean, std).
    Nothing of the image is cropped away, unlike CLIP's short-side resize + centre crop. (ResizeMaxSize skips the
    pad too when the long side is already `size`; a non-square image would then not fit the model, so we pad.)
    """
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        new = (round(h * scale), round(w * scale))  # Python's round, as open_clip
        images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
    h, w = images.shape[-2:]
    pad_h, pad_w = size - h, size - w
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class ClipBackbone(nn.Module):
    """A frozen transformers CLIPModel with its processor's settings: embeds images (in torch) and texts.

    model_path: hub id or folder of the CLIPModel; processor_path: where its processor lives (default: same).
    model: an already built CLIPModel (HPS's, converted from OpenCLIP) instead of loading model_path.
    resize: "crop" = the processor's short-side resize + centre crop (`clip_pixels`); "pad" = HPS v2's long-side
    resize + black pad to the model's image size (`hps_pixels`), the processor's mean and std.
    Pixels, embeddings and scores are float32, or float64 when the backbone is (gradient checks).
    """

    def __init__(self, model_path: str, processor_path: str | None = None, dtype: torch.dtype = torch.float32,
                 model: nn.Module | None = None, resize: Literal["crop", "pad"] = "crop"):
        super().__init__()
        from transformers import AutoProcessor, CLIPModel

        self.name = str(model_path)
        if model is None:
            model = CLIPModel.from_pretrained(model_path, dtype=dtype)
        self.model = model.to(dtype).eval().requires_grad_(False)
        processor = AutoProcessor.from_pretrained(processor_path or model_path)
        self.tokenizer, ip = processor.tokenizer, processor.image_processor
        self.size = {k: ip.size.get(k) for k in ("shortest_edge", "height", "width")}
        self.crop = (ip.crop_size["height"], ip.crop_size["width"]) if getattr(ip, "do_center_crop", False) else None
        self.register_buffer("mean", torch.tensor(ip.image_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std, dtype=torch.float32), persistent=False)
        # A tokenizer saved without model_max_length reports 1e30; the position table is the real limit.
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.embed_dim = self.model.config.projection_dim
        if resize not in ("crop", "pad"):
            raise ValueError(f"resize {resize!r}: expected 'crop' or 'pad'")
        self.resize = resize

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 3, h, w) normalised pixel values on the model's device, float32 (float64
        for a float64 backbone: the buffers' dtype)."""
        images = images.to(self.mean.device, self.mean.dtype)
        if self.resize == "pad":
            return hps_pixels(images, self.model.config.vision_config.image_size, self.mean, self.std)
        return clip_pixels(images, self.size, self.crop, self.mean, self.std)

    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixel values -> projected image embeddings e_I (N, D), float32 (float64 for a float64
        backbone), not unit-normalised."""
        out = self.model.vision_model(pixel_values=pixel_values.to(self.model.dtype))
        return self.model.visual_projection(out.pooler_output).to(self.mean.dtype)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_pixels(self.pixels(images))

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> projected text embeddings e_T (N, D), float32 (truncated to the model's 77 tokens)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.mean.device)
        out = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return self.model.text_projection(out.pooler_output).to(self.mean.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity: (N, D), (N, D) -> (N,)."""
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


# ------------------------------------------------------------------------------------------------ heads


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head, with the key names of `sac+logos+ava1-l14-linearMSE.pth`
    (layers.0/2/4/6/7; the dropout slots 1/3/5 hold no weights). No activations: the released model is this."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = image_embeds.to(self.layers[0].weight.dtype)  # float32 (float64 in gradient checks)
        return self.layers(F.normalize(x, dim=-1)).squeeze(-1)  # (N,)


class RewardMLP(nn.Module):
    """A reward head on CLIP embeddings: three Linear(·, hidden) + LeakyReLU, then Linear(hidden, 1), in two forms.

    head="dpok": DPOK's `RewardModel` (google-research dpok/reward_model.py, `activation='sig'`, its default):
        r(x, z) = σ(MLP([e_T, e_I]))             raw (not normalised) text then image embeddings; r in (0, 1)
    head="mlp": ours,
        r(x, z) = MLP([e_I / |e_I|, e_T / |e_T|])   unit-normalised image then text embeddings; r unbounded
      (CLIP's embedding norms carry no meaning for image-text similarity, as the aesthetic head's input; an
      unbounded r suits the Bradley-Terry loss, whose logit r_w - r_l a sigmoid head caps at ±1).
    The two hold the same weights (`layers.*`) and differ by up to 0.5 on the same ones. The scale matters downstream:
    DPOK multiplies the reward by α (10 to 1000 in its runs) and tuned α for rewards in (0, 1).
    Any leading dims: (..., D), (..., D) -> (...).
    """

    def __init__(self, embed_dim: int, hidden_dim: int = 512, num_hidden_layers: int = 3,
                 head: Literal["dpok", "mlp"] = "mlp"):
        super().__init__()
        if head not in ("dpok", "mlp"):
            raise ValueError(f"reward head {head!r}: expected 'dpok' or 'mlp'")
        self.head = head
        dims = [2 * embed_dim] + [hidden_dim] * num_hidden_layers
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.LeakyReLU()]
        self.layers = nn.Sequential(*layers, nn.Linear(dims[-1], 1))

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        dtype = self.layers[0].weight.dtype  # float32 (float64 in gradient checks)
        e_i, e_t = image_embeds.to(dtype), text_embeds.to(dtype)
        if self.head == "dpok":  # torch.cat([text, img]) -> model -> nn.Sigmoid(), as dpok/reward_model.py
            return torch.sigmoid(self.layers(torch.cat([e_t, e_i], -1))).squeeze(-1)
        return self.layers(torch.cat([F.normalize(e_i, dim=-1), F.normalize(e_t, dim=-1)], -1)).squeeze(-1)


def save_reward_model(folder: str | Path, head: RewardMLP, config: dict) -> None:
    """`folder/model.safetensors` + `folder/config.json`; config must name the CLIP backbone ("clip") and the dims.
    The head's form ("head": "dpok" or "mlp") is written from the module itself."""
    config = {**config, "head": head.head}
    missing = [k for k in ("clip", "embed_dim", "hidden_dim", "num_hidden_layers") if k not in config]
    if missing:
        raise ValueError(f"reward model config: missing {', '.join(missing)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_reward_model(folder: str | Path) -> tuple[RewardMLP, dict]:
    """The head and config that `save_reward_model` wrote."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: a reward model folder holds config.json and model.safetensors "
                                "(written by reward_model.py)")
    config = json.loads((folder / "config.json").read_text())
    # Folders written before the head became a choice hold our linear head ("mlp").
    head = RewardMLP(config["embed_dim"], config["hidden_dim"], config["num_hidden_layers"], config.get("head", "mlp"))
    head.load_state_dict(_load_safetensors(folder / "model.safetensors"))
    return head, config


def _load_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """load_file, with an error that names the file when it is truncated or damaged (safetensors' own message,
    e.g. `incomplete metadata`, does not say which file)."""
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors_rust.SafetensorError, or OSError for an unreadable file
        raise ValueError(f"{file}: not a readable safetensors file, truncated or damaged ({type(e).__name__}: "
                         f"{e}); copy or download it again") from e


# ------------------------------------------------------------------------------------------------ scorers


class ToyScorer(nn.Module):
    """`common.toy.toy_reward`: the fraction of the image painted in the prompt's object colour."""

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from common.toy import toy_reward

        return toy_reward(images, list(prompts)).float()


class ClipScorer(nn.Module):
    """Base of the CLIP-based scorers: batching and devices here, the formula in `score`."""

    def __init__(self, backbone: ClipBackbone, batch_size: int):
        super().__init__()
        self.backbone, self.batch_size = backbone, batch_size

    def score(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != len(images):
            raise ValueError(f"expected images (N, 3, H, W) and N prompts, got {tuple(images.shape)} and "
                             f"{len(prompts)} prompts")
        chunks = []
        for i in range(0, len(images), self.batch_size):
            e_i = self.backbone.embed_images(images[i : i + self.batch_size])  # (b, D)
            e_t = self.backbone.embed_texts(list(prompts[i : i + self.batch_size]))  # (b, D)
            chunks.append(self.score(e_i, e_t).to(self.backbone.mean.dtype))  # float32 (float64 backbone: float64)
        return torch.cat(chunks).to(images.device)  # (N,)


class ClipScore(ClipScorer):
    def score(self, image_embeds, text_embeds):
        return 100.0 * cosine(image_embeds, text_embeds).clamp(min=0)  # 100 · max(cos, 0), Hessel et al. per image


class ClipScoreRaw(ClipScorer):
    def score(self, image_embeds, text_embeds):
        return 100.0 * cosine(image_embeds, text_embeds)  # 100 · cos: torchmetrics' per-image value, and HPS's


def torchmetrics_clip_score(raw_scores: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore of a set from the `clip-raw` scores s_n = 100 · cos_n: max(mean_n s_n, 0).

    Our `clip` column is mean_n max(s_n, 0) (Hessel et al.'s per-image clamp); the two differ only when some
    cos_n < 0, and then ours is the larger."""
    return raw_scores.float().mean().clamp(min=0)


class PickScore(ClipScorer):
    def score(self, image_embeds, text_embeds):
        cos = cosine(image_embeds, text_embeds)
        return self.backbone.model.logit_scale.exp().to(cos.dtype) * cos  # exp(τ) · cos


class AestheticScore(ClipScorer):
    def __init__(self, backbone: ClipBackbone, head: AestheticMLP, batch_size: int):
        super().__init__(backbone, batch_size)
        self.head = head

    def score(self, image_embeds, text_embeds):  # the prompt is ignored; the text tower still runs (tiny cost)
        return self.head(image_embeds)


class RewardModelScore(ClipScorer):
    def __init__(self, backbone: ClipBackbone, head: RewardMLP, batch_size: int):
        super().__init__(backbone, batch_size)
        self.head = head

    def score(self, image_embeds, text_embeds):
        return self.head(image_embeds, text_embeds)


# ------------------------------------------------------------------------------------------------ HPS v2.1


def _weights_file(path: str | None, repo_id: str, filename: str) -> Path:
    """A weights file: `path` itself, `path/filename` for a folder, or (path None) the hub's copy in repo_id."""
    if path is None:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename))
    file = Path(path) / filename if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {filename} there (it is at huggingface.co/{repo_id})")
    return file


# OpenCLIP's ViT-H-14 (open_clip/model_configs/ViT-H-14.json, which HPS v2 uses): 80-wide vision heads, 16 text heads.
OPENCLIP_VIT_H_14 = {"embed_dim": 1024, "vision_cfg": {"head_width": 80}, "text_cfg": {"heads": 16}}


def openclip_to_transformers(state: dict[str, torch.Tensor], model_cfg: dict, eos_token_id: int):
    """An OpenCLIP `CLIP` state dict (OpenAI CLIP's layout) -> (transformers CLIPConfig, CLIPModel state dict).

    Sizes come from the tensors' shapes; what shapes cannot tell (the head counts, GELU vs QuickGELU) from
    model_cfg, OpenCLIP's model config ({"vision_cfg": {"head_width"}, "text_cfg": {"heads"}, "quick_gelu"}).
    Renames: visual.conv1 -> patch_embedding, ln_pre -> pre_layrnorm, resblocks.i.ln_1/ln_2 -> layer_norm1/2,
    attn.in_proj_{weight,bias} -> split in thirds into q_proj, k_proj, v_proj, attn.out_proj -> out_proj,
    mlp.c_fc/c_proj -> mlp.fc1/fc2, ln_post -> post_layernorm, ln_final -> final_layer_norm; the projections
    visual.proj (D, E) and text_projection (W, E) are x @ P in OpenCLIP, nn.Linear weights P^T in transformers.
    Raises on a key it does not know, so nothing is silently dropped.
    """
    from transformers import CLIPConfig

    def tower(prefix: str, out: str, out_state: dict):
        head = prefix + "transformer.resblocks."
        layers = 1 + max(int(k[len(head):].split(".")[0]) for k in state if k.startswith(head))
        for i in range(layers):
            src, dst = f"{prefix}transformer.resblocks.{i}.", f"{out}.encoder.layers.{i}."
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for p in ("weight", "bias"):
                    out_state[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
            for p in ("weight", "bias"):
                q, k, v = state[f"{src}attn.in_proj_{p}"].chunk(3)  # in_proj = [W_q; W_k; W_v] (3D, D)
                out_state.update({f"{dst}self_attn.q_proj.{p}": q, f"{dst}self_attn.k_proj.{p}": k,
                                  f"{dst}self_attn.v_proj.{p}": v})
        width = state[f"{prefix}transformer.resblocks.0.ln_1.weight"].shape[0]
        mlp = state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        return layers, width, mlp

    new: dict[str, torch.Tensor] = {}
    v_layers, v_width, v_mlp = tower("visual.", "vision_model", new)
    t_layers, t_width, t_mlp = tower("", "text_model", new)
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    new |= {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T.contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T.contiguous(),
        "logit_scale": state["logit_scale"],
    }
    used = {"visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding", "visual.ln_pre.weight",
            "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj",
            "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection",
            "logit_scale"}
    unknown = [k for k in state if k not in used and ".resblocks." not in k]
    if unknown:
        raise ValueError(f"OpenCLIP state dict: keys with no place in CLIPModel: {unknown[:8]}")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    head_width = model_cfg.get("vision_cfg", {}).get("head_width", 64)  # OpenCLIP's CLIPVisionCfg default: 64
    config = CLIPConfig(
        text_config=dict(vocab_size=state["token_embedding.weight"].shape[0], hidden_size=t_width,
                         intermediate_size=t_mlp, num_hidden_layers=t_layers,
                         num_attention_heads=model_cfg.get("text_cfg", {}).get("heads", 8),  # CLIPTextCfg default 8
                         max_position_embeddings=state["positional_embedding"].shape[0], hidden_act=act,
                         layer_norm_eps=1e-5, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=v_width, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                           num_attention_heads=v_width // head_width, image_size=grid * patch, patch_size=patch,
                           hidden_act=act, layer_norm_eps=1e-5),
        projection_dim=state["text_projection"].shape[1],
    )
    return config, new


def load_hps_model(path: str | None, tokenizer_eos_id: int, filename: str = HPS_FILE):
    """HPS v2's CLIPModel from `filename` (HPS_v2.1_compressed.pt; v2.0: HPS_v2_compressed.pt) at `path` (the file
    itself, or a folder holding it; None: the hub's copy).

    An `open_clip_config.json` beside it (OpenCLIP's hub format, {"model_cfg": {...}}) gives the head counts; without
    one, ViT-H-14's. torch.load(weights_only=True): the file is a dict of tensors ({"state_dict": ...}), no code.
    """
    from transformers import CLIPModel

    file = _weights_file(path, HPS, filename)
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    # float32, a tensor at a time, each float16 original freed as it goes (HPS v2.1's file is float16: 2 GB, 4 GB as
    # float32); a DDP-saved copy prefixes module.
    state = {k.removeprefix("module."): state.pop(k).float() for k in list(state)}
    cfg_file = file.parent / "open_clip_config.json"
    model_cfg = json.loads(cfg_file.read_text())["model_cfg"] if cfg_file.is_file() else OPENCLIP_VIT_H_14
    config, new = openclip_to_transformers(state, model_cfg, tokenizer_eos_id)
    # from_pretrained with the state dict: the model is built empty and takes these tensors, rather than
    # CLIPModel(config) drawing ~1B random values first and copying over them (at the real shape: 71 s and 9.9 GiB
    # peak RSS before, 38 s and 5.0 GiB after, measured under contention)
    model, info = CLIPModel.from_pretrained(None, config=config, state_dict=new, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:  # every CLIPModel tensor filled, none left over (load_state_dict's strict=True)
        raise ValueError(f"{file}: does not fill HPS's CLIPModel: {bad}")
    return model


# ------------------------------------------------------------------------------------------------ ImageReward


class ImageRewardMLP(AestheticMLP):
    """ImageReward's `MLP(768)`: the aesthetic head's linear stack (same key names, layers.0/2/4/6/7, no
    activations), on BLIP's [CLS] feature as it is (not normalised). (N, 768) -> (N,)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features.to(self.layers[0].weight.dtype)).squeeze(-1)


# ImageReward.pt's keys -> ours. BLIP's ViT (timm's names) -> transformers' BlipVisionModel; BLIP's BERT (med.py) has
# transformers' BlipTextModel names already. Anything matching none of these is an error (no silent drops).
IMAGEREWARD_KEY_MAP = [
    (r"^blip\.visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^blip\.visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^blip\.text_encoder\.", "text_encoder."),
    (r"^mlp\.layers\.", "mlp.layers."),
]
# In the file but not in the score: BLIP's contrastive projections (ImageReward's score never calls them) and
# med.py's persistent position_ids buffer (arange(512); transformers rebuilds it).
IMAGEREWARD_UNUSED = r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$"


def imagereward_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt's state dict -> `ImageRewardModel`'s, through IMAGEREWARD_KEY_MAP; raises on an unknown key."""
    import re

    new, unknown = {}, []
    for key, value in state.items():
        if re.search(IMAGEREWARD_UNUSED, key):
            continue
        for pattern, replacement in IMAGEREWARD_KEY_MAP:
            if re.search(pattern, key):
                new[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"ImageReward state dict: keys with no place in the model: {unknown[:8]}")
    return new


# BLIP's med_config.json as ImageReward ships it (BERT-base with cross-attention), used when none is found.
BLIP_MED_CONFIG = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu")


class ImageRewardModel(nn.Module):
    """ImageReward v1.0 on transformers' BLIP parts. Vision sizes come from the weights' shapes (heads = width / 64,
    true of BLIP's ViT-B and ViT-L; LayerNorm ε 1e-6 as BLIP's ViT), the text encoder's from med_config."""

    def __init__(self, state: dict[str, torch.Tensor], med_config: dict):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        width = state["vision_model.embeddings.class_embedding"].shape[-1]
        patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        grid = round((state["vision_model.embeddings.position_embedding"].shape[1] - 1) ** 0.5)
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
        self.vision_model = BlipVisionModel(BlipVisionConfig(
            hidden_size=width, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=layers, num_attention_heads=width // 64, image_size=grid * patch, patch_size=patch,
            layer_norm_eps=1e-6, hidden_act="gelu"))
        text = {k: med_config.get(k, v) for k, v in BLIP_MED_CONFIG.items()}
        # is_decoder=True builds the cross-attention layers; forward(is_decoder=False) keeps the self-attention
        # bidirectional, as BLIP's BertModel in mode 'multimodal'.
        # bos = BLIP's [DEC] (the second-last row); the encoder never reads bos/sep, set only so the config is sane
        self.text_encoder = BlipTextModel(BlipTextConfig(**text, encoder_hidden_size=width, is_decoder=True,
                                                         bos_token_id=text["vocab_size"] - 2, sep_token_id=None),
                                          add_pooling_layer=False)
        self.mlp = ImageRewardMLP(text["hidden_size"])
        self.image_size = grid * patch


class ImageRewardScore(nn.Module):
    """s(x, z) = (MLP(BLIP_text(z | BLIP_vision(x))[:, 0]) - μ) / σ, ImageReward's `score`, batched and in torch."""

    def __init__(self, model: ImageRewardModel, tokenizer, batch_size: int):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != len(images):
            raise ValueError(f"expected images (N, 3, H, W) and N prompts, got {tuple(images.shape)} and "
                             f"{len(prompts)} prompts")
        s, device, dtype = self.model.image_size, self.mean.device, self.model.vision_model.dtype
        chunks = []
        for i in range(0, len(images), self.batch_size):
            # Resize(224, bicubic) + CenterCrop(224) + Normalize(CLIP's mean, std), ImageReward's _transform
            pixels = clip_pixels(images[i : i + self.batch_size].to(device, self.mean.dtype), {"shortest_edge": s},
                                 (s, s), self.mean, self.std, round_crop=True)  # (b, 3, 224, 224), float32
            tokens = self.tokenizer(list(prompts[i : i + self.batch_size]), padding="max_length", truncation=True,
                                    max_length=35, return_tensors="pt").to(device)  # [CLS] ... [SEP] [PAD]..
            image_embeds = self.model.vision_model(pixel_values=pixels.to(dtype)).last_hidden_state  # (b, 1+P, Dv)
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
            text = self.model.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                           is_decoder=False).last_hidden_state[:, 0]  # (b, 768)
            chunks.append((self.model.mlp(text) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD)
        return torch.cat(chunks).to(images.device)  # (N,)


def load_imagereward(path: str | None, tokenizer_path: str | None = None, dtype: torch.dtype = torch.float32):
    """(ImageRewardModel, tokenizer) from `ImageReward.pt` (a file, or a folder holding it and med_config.json;
    None: THUDM/ImageReward on the hub) and BLIP's BERT tokenizer (default bert-base-uncased, + [DEC], [ENC])."""
    from transformers import AutoTokenizer

    file = _weights_file(path, IMAGEREWARD, "ImageReward.pt")
    state = torch.load(file, map_location="cpu", weights_only=True)  # a plain state dict: tensors only
    state = state.get("state_dict", state)
    med_file = file.parent / "med_config.json"
    if path is None:
        from huggingface_hub import hf_hub_download

        med_file = Path(hf_hub_download(IMAGEREWARD, "med_config.json"))
    med_config = json.loads(med_file.read_text()) if med_file.is_file() else {}
    new = imagereward_to_transformers(state)
    model = ImageRewardModel(new, med_config)
    model.load_state_dict(new, strict=True)  # every tensor of the model filled, none left over
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or BERT_BASE)
    # BLIP's init_tokenizer: a [DEC] bos token and an [ENC] token (ids 30522, 30523 of the 30524-row table)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    model = model.to(dtype)
    model.mlp.float()  # the head stays float32, as the other scorers' heads
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ loading


def _load_aesthetic_head(path: str) -> AestheticMLP:
    if path.endswith(".safetensors"):
        state = _load_safetensors(path)
    else:  # the released .pth is a plain state dict; weights_only refuses anything that would run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "layers.0.weight" not in state:
        raise ValueError(f"{path}: not a LAION aesthetic head (no 'layers.0.weight'; keys: {sorted(state)[:8]})")
    head = AestheticMLP(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head


ScorerName = Literal["toy", "clip", "clip-raw", "pickscore", "hps", "imagereward", "aesthetic", "reward-model"]


def load_scorer(name: ScorerName, path: str | None = None, *, clip_path: str | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 64,
                flags: tuple[str, str] = ("path=", "clip_path="), feedback: bool = False) -> Scorer:
    """A scorer `(images (N, 3, H, W) in [0, 1], prompts) -> (N,) float32` on the images' device.
    Weights that cannot be loaded (offline and no local copy, a wrong folder) raise an OSError that names `flags`,
    the caller's spelling of `path` and `clip_path` (e.g. ("--scorer-path", "--clip-path")).

    name="toy":          path ignored.
    name="clip", "clip-raw": path = the CLIPModel (default openai/clip-vit-large-patch14); clip_path = its processor
                         if elsewhere (default: the same folder).
    name="pickscore":    path = the model (default yuvalkirstain/PickScore_v1); clip_path = the processor
                         (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    name="hps":          path = HPS_v2.1_compressed.pt or a folder holding it (default: xswu/HPSv2 on the hub);
                         clip_path = the processor (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K, OpenCLIP's).
    name="imagereward":  path = ImageReward.pt or a folder holding it and med_config.json (default: THUDM/ImageReward
                         on the hub); clip_path = BLIP's BERT tokenizer (default bert-base-uncased).
    name="aesthetic":    path = the head's weights (.safetensors or .pth, required); clip_path = the CLIP backbone
                         (default openai/clip-vit-large-patch14); its projection dim must equal the head's input.
    name="reward-model": path = a folder written by reward_model.py (required); clip_path overrides the backbone
                         its config.json names (e.g. a local copy of it).
    The backbones run in `dtype` on `device` (float16/bfloat16 on a GPU is fine); the heads and the scores stay
    float32. dtype=torch.float64 (for gradient checks): everything, heads, pixels and scores included, in float64.

    feedback=True: the defaults of Diffusion-DPO's AI feedback (official `--choice_model`, utils/*_utils.py), which
    differ from the evaluation ones for two names: "clip" and "clip-raw" = 100 · cos(e_I, e_T) (no clamp) of OpenCLIP
    ViT-H/14 laion2B-s32B-b79K (default path laion/CLIP-ViT-H-14-laion2B-s32B-b79K), its image preprocessed as HPS
    v2's (`hps_pixels`: long side resize + black pad); "hps" = HPS v2.0 (HPS_v2_compressed.pt), not v2.1. The other
    names are already the official choice models (pickscore; aesthetic on CLIP ViT-L/14) or not among them.

    The returned module has no no_grad inside: under torch.no_grad() (every evaluation caller) it builds no graph;
    for reward backpropagation call it through `differentiable_score`.
    """
    try:
        scorer = _build_scorer(name, path, clip_path, dtype, batch_size, feedback)
    except OSError as e:  # transformers / huggingface_hub: not a local folder, and the hub is unreachable or lacks it
        raise OSError(f"scorer {name!r} could not load its weights (path {path or 'None: the hub default'}, "
                      f"processor/backbone {clip_path or 'the default'}): {str(e).splitlines()[0][:300]}\n"
                      f"Offline, pass local copies with {flags[0]} (weights) and {flags[1]} (processor or "
                      "backbone)") from e
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # a file cut short or not weights
        where = f"{flags[0]} {path or 'None: the hub default'}, {flags[1]} {clip_path or 'the default'}"
        raise ValueError(f"scorer {name!r}: a weights file could not be read ({where}): {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}. Is it truncated (an interrupted download) or another "
                         "file under the expected name? Download it again.") from e
    broken = [n for n, t in itertools.chain(scorer.named_parameters(), scorer.named_buffers())
              if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:  # else every score is NaN, and a script says something about the scores instead of the weights
        raise ValueError(f"scorer {name!r}: its weights ({flags[0]} {path or 'None: the hub default'}) hold NaN or "
                         f"inf values in {len(broken)} tensors (e.g. {', '.join(broken[:3])}): they are broken")
    if dtype == torch.float64:
        scorer = scorer.double()  # the float32 heads and buffers too, so a finite-difference check sees float64 only
    return scorer.to(device).eval().requires_grad_(False)


# Every scorer above is differentiable with respect to the pixels (resize, crop/pad and normalisation in torch, no
# PIL, no detach, no no_grad inside). Flat spots: clip's max(cos, 0) has zero gradient where cos < 0 (use clip-raw to
# backpropagate), and clip_pixels' clamps (PIL's 8-bit saturation) where a resized pixel leaves [0, 1].
DIFFERENTIABLE: tuple[str, ...] = get_args(ScorerName)


def differentiable_score(scorer: Scorer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """r(x, z) with its graph back to the pixels, for reward backpropagation (DRaFT, AlignProp, ReFL).

    scorer: from `load_scorer` (any name in DIFFERENTIABLE); images: (N, 3, H, W) in [0, 1] that require grad (e.g.
    the VAE decode of latents that do, mapped by x * 0.5 + 0.5); prompts: N strings. Returns (N,) float32 (float64 for
    a float64 scorer) with a grad_fn: `(-reward.mean()).backward()` reaches the images and, through them, whatever
    made them. The scorer's weights stay frozen (requires_grad False): no gradient is stored on them. Runs under
    torch.enable_grad(), so a no_grad left around the call cannot silently cut the graph. The values equal
    `scorer(images, prompts)` under torch.no_grad() (the evaluation path), which is the cheaper call when no gradient
    is wanted. To save memory on a GPU, load the scorer in bfloat16 (dtype=) and/or score fewer images per call.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"differentiable_score: expected images (N, 3, H, W), got {tuple(images.shape)}")
    if not images.requires_grad:
        raise ValueError("differentiable_score: the images do not require grad, so no gradient can reach what made "
                         "them (decoded under torch.no_grad(), or detached?); for scores alone call the scorer under "
                         "torch.no_grad()")
    with torch.enable_grad():
        return scorer(images, list(prompts))


def scorer_fingerprint(name: str, path: str | None, clip_path: str | None, dist=None) -> str:
    """The content key of a scorer's weights for a cache of its scores (common.runtime.fingerprint): its files (path,
    clip_path), and for a reward model the CLIP backbone its config.json names. A reward model retrained into the same
    folder gets another key; a hub default is keyed by its name and local snapshot."""
    from common.runtime import fingerprint

    parts = [path, clip_path]
    if name == "reward-model" and clip_path is None and path is not None and (Path(path) / "config.json").is_file():
        parts.append(json.loads((Path(path) / "config.json").read_text()).get("clip"))
    return f"{name}:{fingerprint(*parts, dist=dist)}"


def _build_scorer(name: str, path: str | None, clip_path: str | None, dtype: torch.dtype, batch_size: int,
                  feedback: bool = False):
    if name == "toy":
        scorer: nn.Module = ToyScorer()
    elif name in ("clip", "clip-raw") and feedback:  # Diffusion-DPO's clip choice model: utils/clip_utils.py
        scorer = ClipScoreRaw(ClipBackbone(path or CLIP_H14, clip_path, dtype, resize="pad"), batch_size)
    elif name in ("clip", "clip-raw"):
        backbone = ClipBackbone(path or CLIP_L14, clip_path, dtype)
        scorer = ClipScore(backbone, batch_size) if name == "clip" else ClipScoreRaw(backbone, batch_size)
    elif name == "pickscore":
        scorer = PickScore(ClipBackbone(path or PICKSCORE, clip_path or PICKSCORE_PROCESSOR, dtype), batch_size)
    elif name == "hps":
        from transformers import AutoTokenizer

        processor = clip_path or PICKSCORE_PROCESSOR
        model = load_hps_model(path, AutoTokenizer.from_pretrained(processor).eos_token_id,
                               HPS_V2_0_FILE if feedback else HPS_FILE)
        # HPS v2 = cos(e_I, e_T) (hpsv2.score), printed x 100: the clip-raw formula on HPS's fine-tuned CLIP, with
        # HPS's own preprocessing (long side resize + pad)
        scorer = ClipScoreRaw(ClipBackbone(path or HPS, processor, dtype, model=model, resize="pad"), batch_size)
    elif name == "imagereward":
        model, tokenizer = load_imagereward(path, clip_path, dtype)
        scorer = ImageRewardScore(model, tokenizer, batch_size)
    elif name == "aesthetic":
        if path is None:
            raise ValueError("aesthetic: pass path= the head's weights, e.g. sac+logos+ava1-l14-linearMSE.pth from "
                             "github.com/christophschuhmann/improved-aesthetic-predictor")
        head = _load_aesthetic_head(str(path))
        backbone = ClipBackbone(clip_path or CLIP_L14, None, dtype)
        if backbone.embed_dim != head.layers[0].in_features:
            raise ValueError(f"aesthetic: the head {path} takes {head.layers[0].in_features}-dim embeddings but the "
                             f"CLIP backbone {backbone.name} makes {backbone.embed_dim}-dim ones (pass clip_path=)")
        scorer = AestheticScore(backbone, head, batch_size)
    elif name == "reward-model":
        if path is None:
            raise ValueError("reward-model: pass path= a folder written by reward_model.py "
                             "(config.json, model.safetensors)")
        head, config = load_reward_model(path)
        backbone = ClipBackbone(clip_path or config["clip"], None, dtype)
        if backbone.embed_dim != config["embed_dim"]:
            raise ValueError(f"reward-model: {path} was trained on {config['embed_dim']}-dim embeddings of "
                             f"{config['clip']}, but {backbone.name} makes {backbone.embed_dim}-dim ones")
        scorer = RewardModelScore(backbone, head, batch_size)
    else:
        raise ValueError(f"unknown scorer {name!r}; expected one of {', '.join(get_args(ScorerName))}")
    return scorer
