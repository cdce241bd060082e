"""The two model families the training scripts take, side by side: Stable Diffusion 1.5 and SDXL (base and turbo).

A script calls `model_family(args.model)` once; the family is chosen from the UNet's config (SDXL's UNet has
`addition_embed_type == "text_time"`), never from a flag, so the same `--model` takes either. Everything that
differs between the two lives in the small functions below, one pair per difference:

                    SD1.5 (runwayml, 512 px)                  SDXL (stabilityai/stable-diffusion-xl-base-1.0, 1024 px)
    text encoders   CLIPTextModel                             CLIPTextModel + CLIPTextModelWithProjection
    encode_text     last hidden state (B, 77, 768)            penultimate hidden state of each, concatenated on the
                                                              feature axis (B, 77, 768 + 1280); pooled (B, 1280) =
                                                              the second encoder's projected output
    unet_inputs     encoder_hidden_states                     + added_cond_kwargs: text_embeds = pooled, time_ids =
                                                              (H, W, 0, 0, H, W): original size, crop top-left, target
    pipeline        StableDiffusionPipeline                   StableDiffusionXLPipeline

The UNet is then called the same way for both: `unet(x_t, t, **unet_inputs(text, resolution)).sample`.
SDXL's text encoding is StableDiffusionXLPipeline.encode_prompt's without guidance (tests/test_sdxl.py checks it);
its time_ids are the pipeline's `_get_add_time_ids` at that resolution. sdxl-turbo is an SDXL whose training draws
t from {249, 499, 749, 999} (`turbo_timesteps`) on a zero-terminal-SNR schedule (`zero_terminal_snr`); it is told
by its name, as the official code does.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


# ---------------------------------------------------------------- text encoding
def encode_text_sd15(captions: list[str], tokenizers: list, text_encoders: list) -> torch.Tensor:
    """SD1.5: the CLIP text encoder's last hidden state, (B, 77, D)."""
    tokenizer, text_encoder = tokenizers[0], text_encoders[0]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]  # (B, 77, D)


def encode_text_sdxl(captions: list[str], tokenizers: list, text_encoders: list) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: (hidden (B, 77, D1 + D2), pooled (B, P)). Each encoder's penultimate hidden state (`hidden_states[-2]`),
    concatenated on the feature axis; pooled is the second encoder's (CLIPTextModelWithProjection) projected output."""
    hidden = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (B, 77, D_k)
    return torch.cat(hidden, dim=-1), out.text_embeds  # (B, 77, D1 + D2), (B, P) of the last (second) encoder


# ---------------------------------------------------------------- the UNet's conditioning inputs
def sdxl_time_ids(resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning for a square training image: (original H, W, crop top, left, target H, W) =
    (R, R, 0, 0, R, R), as the official train.py; (6,) float32."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)


def unet_inputs_sd15(text: torch.Tensor, resolution: int) -> dict:
    """SD1.5: the UNet's keyword inputs from encode_text_sd15's output (B rows)."""
    return {"encoder_hidden_states": text}


def unet_inputs_sdxl(text: tuple[torch.Tensor, torch.Tensor], resolution: int) -> dict:
    """SDXL: encoder_hidden_states, plus added_cond_kwargs {text_embeds: pooled (B, P), time_ids (B, 6)}."""
    hidden, pooled = text
    time_ids = sdxl_time_ids(resolution).to(hidden.device, hidden.dtype).repeat(len(hidden), 1)  # (B, 6)
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


# ---------------------------------------------------------------- timesteps
def turbo_timesteps(t: torch.Tensor) -> torch.Tensor:
    """sdxl-turbo: t ~ U{0..999} mapped to the 4 steps it samples with, 250·(t mod 4) + 249 ∈ {249, 499, 749, 999}
    (the official train.py)."""
    return 250 * (t % 4) + 249


def all_timesteps(t: torch.Tensor) -> torch.Tensor:
    """SD1.5, SDXL base: t ~ U{0..999} as drawn."""
    return t


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sdxl-turbo's training schedule in the official train.py: ᾱ rescaled to zero terminal SNR (Lin et al. 2023,
    https://arxiv.org/abs/2305.08891, Alg. 1), because turbo samples from pure noise at t = 999:
        s_t = √ᾱ_t;   s'_t = (s_t − s_T) · s_0 / (s_0 − s_T);   ᾱ'_t = s'_t²     so ᾱ'_0 = ᾱ_0 and ᾱ'_T = 0."""
    s = alphas_cumprod.sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    return s ** 2


def is_turbo(model: str) -> bool:
    """A turbo model is one whose hub id or folder name contains "turbo" (as the official code tells it)."""
    return "turbo" in model.lower()


# ---------------------------------------------------------------- the family
@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: type
    text_encoder_classes: tuple  # one per text encoder, in subfolders text_encoder, text_encoder_2
    encode_text: Callable  # (captions, tokenizers, text_encoders) -> the text conditioning of B captions
    unet_inputs: Callable  # (that conditioning, resolution) -> the UNet's keyword inputs
    resolution: int  # the training resolution of the official recipe


SD15 = Family("sd15", StableDiffusionPipeline, (CLIPTextModel,), encode_text_sd15, unet_inputs_sd15, 512)
SDXL = Family("sdxl", StableDiffusionXLPipeline, (CLIPTextModel, CLIPTextModelWithProjection), encode_text_sdxl,
              unet_inputs_sdxl, 1024)


def model_family(model: str) -> Family:
    """SDXL if the pipeline's UNet takes SDXL's added conditioning (addition_embed_type "text_time"), else SD1.5."""
    config = UNet2DConditionModel.load_config(model, subfolder="unet")
    return SDXL if config.get("addition_embed_type") == "text_time" else SD15


def load_text_encoders(model: str, family: Family, device, dtype) -> tuple[list, list]:
    """The family's tokenizers and frozen text encoders (subfolders tokenizer[_2], text_encoder[_2])."""
    tokenizers, encoders = [], []
    for k, cls in enumerate(family.text_encoder_classes):
        suffix = f"_{k + 1}" if k else ""
        tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder=f"tokenizer{suffix}"))
        encoders.append(cls.from_pretrained(model, subfolder=f"text_encoder{suffix}").to(device, dtype)
                        .requires_grad_(False))
    return tokenizers, encoders


def ddim_sampler(scheduler_config) -> DDIMScheduler:
    """DDIM over the model's noise schedule, for sample grids and generated sets. clip_sample and set_alpha_to_one are
    False as in SD1.5's own scheduler config (a no-op there); SDXL ships an Euler config that lacks them, and DDIM's
    defaults (True) would clip the predicted latent x_0 to [−1, 1], which ruins samples: latents are not in [−1, 1]."""
    return DDIMScheduler.from_config(scheduler_config, clip_sample=False, set_alpha_to_one=False)


def load_vae(model: str, vae: str | None, device, dtype):
    """The pipeline's VAE, or the one `vae` names (SDXL in fp16: madebyollin/sdxl-vae-fp16-fix), frozen."""
    from diffusers import AutoencoderKL

    loaded = AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL.from_pretrained(model, subfolder="vae")
    return loaded.to(device, dtype).requires_grad_(False)


def make_pipeline(family: Family, model: str, unet, vae, tokenizers: list, text_encoders: list, scheduler):
    """A sampling pipeline of the family around these parts (no safety checker for SD1.5; SDXL keeps the model's
    force_zeros_for_empty_prompt, the unconditional branch of guidance)."""
    if family is SDXL:
        zeros = StableDiffusionXLPipeline.load_config(model).get("force_zeros_for_empty_prompt", True)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=zeros)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_final(family: Family, unet, lora: bool, model: str, out: Path) -> str:
    """The trained weights in diffusers' format: `out/final/lora` through the family's save_lora_weights (which its
    load_lora_weights reads), or `out/final/unet`. Returns a line of code that loads the result from any folder."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from common.runtime import absolute

    name = family.pipeline_class.__name__
    if lora:
        family.pipeline_class.save_lora_weights(
            out / "final" / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
        return (f'from diffusers import {name}; pipe = {name}.from_pretrained("{absolute(model)}"); '
                f'pipe.load_lora_weights("{absolute(out / "final" / "lora")}")')
    unet.save_pretrained(out / "final" / "unet")
    return (f'from diffusers import {name}, UNet2DConditionModel; pipe = {name}.from_pretrained("{absolute(model)}", '
            f'unet=UNet2DConditionModel.from_pretrained("{absolute(out / "final" / "unet")}"))')
