"""Speed and memory of every method's training step, side by side, in one run.

Each variant runs in its own subprocess (so its peak memory is its own), builds randomly initialised models of the
chosen size (weights are not needed to measure speed), times `--steps` optimizer steps after `--warmup` untimed
ones, and reports seconds per step, items per second, peak memory and, on a GPU, the model FLOP utilisation
(FLOPs of one step counted by `torch.utils.flop_counter`, divided by the time and the device's dense peak).

Each step is the method's own: the same model calls and the same loss kernels (`common/kernels.py`) its script uses.

    python benchmarks/bench.py                                   # toy + medium, every method, on this machine
    python benchmarks/bench.py --sizes sd15 --mixed-precision bf16 --methods dpo   # SD1.5 UNet at 512 px, GPU

Sizes: `toy` is the toy world's model (32 px, 4x8x8 latents); `medium` halves SD1.5's UNet channels at 256 px
(4x32x32 latents); `sd15` is SD1.5's UNet, VAE and CLIP ViT-L/14 text encoder configs at 512 px (4x64x64 latents);
`sdxl` is SDXL base's UNet (benchmarks/configs/sdxl, with its added text-and-time conditioning) at 1024 px (4x128x128
latents), `sdxl-toy` the same architecture shrunk (for benchmarks/gpu.py --dry-run). The Adafactor variant uses
diffusion_dpo.py's SDXL settings (no relative step, no parameter scaling, update clipping 1.0).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # common/ and benchmarks/ importable
from common import kernels  # noqa: E402

Size = Literal["toy", "medium", "sd15", "sdxl", "sdxl-toy"]
Method = Literal["dpo", "dpok", "sft", "reward"]


@dataclass
class Args:
    sizes: tuple[Size, ...] = ("toy", "medium")
    """model sizes to measure"""
    methods: tuple[Method, ...] = ("dpo", "dpok", "sft", "reward")
    """methods to measure"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """autocast dtype over fp32 master weights (the scripts' --mixed-precision)"""
    pairs: int = 1
    """Diffusion-DPO pairs per step (per device); SFT and DPOK updates use 2x this many images"""
    steps: int = 3
    """timed optimizer steps per variant"""
    warmup: int = 1
    """untimed steps first (compilation happens here)"""
    rollout_steps: int = 10
    """DDIM steps per DPOK rollout (the paper: 50)"""
    variants: tuple[str, ...] = ()
    """only these variant names (e.g. lora+ckpt); empty = all"""
    out: str = "benchmarks/results.md"
    """markdown table written here (and the raw rows as .json beside it)"""
    only: str = ""
    """internal: run one variant ('method/size/variant') in this process and print its JSON row"""


# Variants per method: (name, options). Options: lora, ckpt (gradient checkpointing), compile, cache.
VARIANTS = {
    "dpo": [("full", {}), ("full+ckpt", {"ckpt": 1}), ("full+compile", {"compile": 1}), ("full+no-cache", {"cache": 0}),
            ("lora", {"lora": 1}), ("lora+ckpt", {"lora": 1, "ckpt": 1}),
            ("full+adafactor+ckpt", {"adafactor": 1, "ckpt": 1})],
    "dpok": [("rollout", {"lora": 1}), ("update", {"lora": 1})],
    "sft": [("full", {}), ("lora", {"lora": 1})],
    "reward": [("cached", {"cache": 1}), ("no-cache", {"cache": 0})],
}
# Dense bf16/fp16 peak of known devices, FLOP/s (vendor data sheets, SXM parts).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def unet_config(size: Size) -> tuple[dict, int]:
    """UNet2DConditionModel kwargs and the latent side for a size."""
    if size.startswith("sdxl"):  # the published config (benchmarks/configs/sdxl/unet), or shrunk for a dry run
        from benchmarks.real_shapes import CONFIGS, _scaled

        cfg = json.loads((CONFIGS / "sdxl" / "unet" / "config.json").read_text())
        if size == "sdxl-toy":
            cfg = {**_scaled(cfg, 0.1), "cross_attention_dim": 64}
            cfg["projection_class_embeddings_input_dim"] = 6 * cfg["addition_time_embed_dim"] + 64
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("in_channels", "out_channels")}
        return cfg, cfg["sample_size"]
    if size == "toy":
        return dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                    cross_attention_dim=32, attention_head_dim=8), 8
    sd15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if size == "medium":
        return {**sd15, "block_out_channels": (160, 320, 640, 640), "sample_size": 32}, 32
    return {**sd15, "sample_size": 64}, 64


def build(size: Size, device: str, lora: bool, ckpt: bool):
    from diffusers import UNet2DConditionModel

    cfg, side = unet_config(size)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg).to(device)
    ref = None
    if lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if ckpt:
        unet.enable_gradient_checkpointing()
    return unet, ref, side, cfg["cross_attention_dim"]


@contextlib.contextmanager
def reference(unet, frozen):
    """The reference model: a frozen copy (full fine-tune) or the same UNet with its adapters off (LoRA)."""
    if frozen is not None:
        yield frozen
    else:
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()


def encoders(size: Size, device: str):
    """VAE encoder + text encoder of the size (for the no-cache variants)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    if size == "toy":
        vae = AutoencoderKL(latent_channels=4, layers_per_block=1, norm_num_groups=8, block_out_channels=(16, 32, 32),
                            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            mid_block_add_attention=False)
        text = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        return vae.to(device), CLIPTextModel(text).to(device), 32
    vae = AutoencoderKL(latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)  # ViT-L/14's
    return vae.to(device), CLIPTextModel(text).to(device), 256 if size == "medium" else 512


def make_step(method: str, size: Size, variant: dict, args: Args):
    """Returns (step function doing one optimizer step, items per step, item name)."""
    dev = args.device
    lora, ckpt = bool(variant.get("lora")), bool(variant.get("ckpt"))
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    autocast = lambda: torch.autocast(dev.split(":")[0], dtype=amp, enabled=amp is not None)  # noqa: E731
    g = torch.Generator(dev).manual_seed(0)

    if method == "reward":  # the DPOK/Lee et al. MLP on CLIP embeddings; without the cache, CLIP runs every step
        from transformers import CLIPConfig, CLIPModel

        dim = 32 if size == "toy" else 768
        mlp = torch.nn.Sequential(torch.nn.Linear(2 * dim, 512), torch.nn.LeakyReLU(), torch.nn.Linear(512, 512), torch.nn.LeakyReLU(),
                                  torch.nn.Linear(512, 512), torch.nn.LeakyReLU(), torch.nn.Linear(512, 1)).to(dev)
        opt = torch.optim.AdamW(mlp.parameters(), lr=1e-4)
        B = 64
        clip = None
        if not variant.get("cache"):
            vision = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
            if size == "toy":
                vision = dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
            elif size == "medium":
                vision = {**vision, "num_hidden_layers": 12}
            text = dict(hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=2 if size == "toy" else 12, num_attention_heads=4 if size == "toy" else 12)
            clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)).to(dev).eval()
            pixels = torch.randn(2 * B, 3, vision["image_size"], vision["image_size"], device=dev, generator=g)
            ids = torch.randint(0, 1000, (B, 77), device=dev, generator=g)
        emb = torch.randn(2 * B, 2 * dim, device=dev, generator=g)

        def step():
            x = emb
            if clip is not None:
                with torch.no_grad(), autocast():
                    # the projected pooled outputs, as common/scorers.py computes them
                    img = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
                    txt = clip.text_projection(clip.text_model(input_ids=ids).pooler_output).repeat(2, 1)
                x = torch.cat([img, txt], 1).float()
            r_w, r_l = mlp(x).squeeze(1).chunk(2)
            loss = -F.logsigmoid(r_w - r_l).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, B, "pairs"

    unet, frozen, side, cross = build(size, dev, lora, ckpt)
    if not lora and method in ("dpo", "dpok"):
        from diffusers import UNet2DConditionModel

        # stored in the autocast dtype, as diffusion_dpo.py and dpok.py store their frozen reference
        frozen = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_config(size)[0]).to(dev).requires_grad_(False)
        frozen = frozen.to(amp) if amp is not None else frozen
    params = [p for p in unet.parameters() if p.requires_grad]
    n = 2 * args.pairs
    if variant.get("adafactor"):
        from transformers import Adafactor

        opt = Adafactor(params, lr=1e-5, relative_step=False, scale_parameter=False, warmup_init=False, clip_threshold=1.0)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)
    compiled = torch.compile(unet) if variant.get("compile") else unet
    added = {}
    if size.startswith("sdxl"):  # SDXL's added conditioning: pooled text (n, P) and time ids (n, 6)
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        time_ids = torch.tensor([8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side], device=dev)
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(n, pooled, device=dev, generator=g), "time_ids": time_ids.repeat(n, 1)}}
        added2 = {"added_cond_kwargs": {k: torch.cat([v, v]) for k, v in added["added_cond_kwargs"].items()}}
    else:
        added2 = {}
    fwd = lambda x, t, c: compiled(x, t, c, **added)  # noqa: E731
    dpo_loss = kernels.compiled(kernels.dpo_loss, enabled=bool(variant.get("compile")))
    alpha_bar = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=dev).pow(2).neg().add(1).cumprod(0)  # SD1.5's ᾱ_t
    cond = torch.randn(n, 77, cross, device=dev, generator=g)

    def noisy(x0, shared_by_pairs: bool):
        """q(x_t | x_0); Diffusion-DPO draws one t and one eps per pair, shared by winner and loser."""
        m = x0.shape[0] // 2 if shared_by_pairs else x0.shape[0]
        t = torch.randint(0, 1000, (m,), device=dev, generator=g)
        eps = torch.randn((m, *x0.shape[1:]), device=dev, generator=g)
        if shared_by_pairs:
            t, eps = torch.cat([t, t]), torch.cat([eps, eps])
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps

    if method in ("dpo", "sft"):
        cache = variant.get("cache", 1)
        if not cache:
            vae, text_encoder, px = encoders(size, dev)
            pixels = torch.randn(n, 3, px, px, device=dev, generator=g)
            ids = torch.randint(0, 100, (args.pairs, 77), device=dev, generator=g)
        latents = torch.randn(n, 4, side, side, device=dev, generator=g)

        def step():
            x0, c = latents, cond
            if not cache:  # what the latent cache saves: VAE encoding and text encoding every step
                with torch.no_grad(), autocast():
                    x0 = vae.encode(pixels).latent_dist.sample() * 0.18215
                    c = text_encoder(ids).last_hidden_state.repeat(2, 1, 1)
            x_t, t, eps = noisy(x0, shared_by_pairs=method == "dpo")
            with autocast():
                pred = fwd(x_t, t, c).sample
                if method == "dpo":
                    with torch.no_grad(), reference(unet, frozen) as ref:
                        ref_pred = ref(x_t, t, c, **added).sample
                    loss = dpo_loss(pred, ref_pred, eps, 5000.0)[0]
                else:
                    loss = kernels.stream_mse(pred[None], eps).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        return step, args.pairs if method == "dpo" else n, "pairs" if method == "dpo" else "images"

    # DPOK: a rollout samples trajectories with classifier-free guidance (one UNet call on [uncond; cond]) and records
    # each step's log-probability; an update takes one gradient step on a minibatch of stored transitions.
    k = n

    def ddim_mean(x, eps, a, a_prev, sigma):
        """μ = √ᾱ_{t-1}·x̂₀ + √(1 − ᾱ_{t-1} − σ_t²)·ε̂ with x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t."""
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps

    def rollout():
        x = torch.randn(k, 4, side, side, device=dev, generator=g)
        ts = torch.linspace(999, 0, args.rollout_steps, device=dev).long()
        with torch.no_grad(), autocast():
            for i, t in enumerate(ts):
                e_u, e_c = unet(torch.cat([x, x]), t.expand(2 * k), torch.cat([cond, cond]), **added2).sample.float().chunk(2)
                eps = e_u + 7.5 * (e_c - e_u)
                a, a_prev = alpha_bar[t], alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=dev)
                sigma = ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # η = 1
                mean = ddim_mean(x, eps, a, a_prev, sigma)
                x_new = mean + sigma * torch.randn(x.shape, device=dev, generator=g)
                kernels.gaussian_log_prob(x_new, mean, sigma.clamp(min=1e-6))
                x = x_new

    x_t = torch.randn(k, 4, side, side, device=dev, generator=g)
    t = torch.randint(0, 1000, (k,), device=dev, generator=g)
    x_prev = torch.randn_like(x_t)
    old_logp = torch.zeros(k, device=dev)
    adv = torch.randn(k, device=dev, generator=g)

    def update():
        with autocast():
            e_u, e_c = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, cond]), **added2).sample.float().chunk(2)
            eps = e_u + 7.5 * (e_c - e_u)
            with torch.no_grad(), reference(unet, frozen) as ref:
                r_u, r_c = ref(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, cond]), **added2).sample.float().chunk(2)
            a, a_prev = alpha_bar[t].view(-1, 1, 1, 1), alpha_bar[(t - 20).clamp(min=0)].view(-1, 1, 1, 1)
            sigma = ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt().clamp(min=1e-6)
            logp = kernels.gaussian_log_prob(x_prev, ddim_mean(x_t, eps, a, a_prev, sigma), sigma)
            ratio = torch.clamp(torch.exp(logp - old_logp), 1 - 1e-4, 1 + 1e-4)
            loss = (-10.0 * adv * ratio).mean() + 0.01 * kernels.eps_mse_kl(eps, r_u + 7.5 * (r_c - r_u)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()

    if "rollout" in variant.get("name", ""):
        return rollout, k, "trajectories"
    return update, k, "transitions"


def flops_of(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def run_one(args: Args) -> dict:
    method, size, name = args.only.split("/")
    variant = dict(dict(VARIANTS[method])[name], name=name)
    torch.manual_seed(0)
    step, items, unit = make_step(method, size, variant, args)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    sec = (time.perf_counter() - t0) / args.steps
    row = dict(method=method, size=size, variant=name, s_per_step=sec, items_per_s=items / sec, unit=unit)
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak and not variant.get("compile"):
            row["mfu"] = flops_of(step) / sec / peak
    else:
        row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)
    return row


def main(args: Args) -> None:
    if args.only:
        print("ROW " + json.dumps(run_one(args)), flush=True)
        return
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    rows = []
    for size in args.sizes:
        for method in args.methods:
            for name, _ in VARIANTS[method]:
                if args.variants and name not in args.variants:
                    continue
                cmd = [sys.executable, __file__, "--only", f"{method}/{size}/{name}", "--device", args.device,
                       "--mixed-precision", args.mixed_precision, "--pairs", str(args.pairs), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--rollout-steps", str(args.rollout_steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
                row = json.loads(line[4:]) if line else dict(method=method, size=size, variant=name, error=(proc.stderr.strip().splitlines() or ["?"])[-1][:120])
                rows.append(row)
                print(json.dumps(row), flush=True)
    # Ratios between variants measured in the same run.
    by = {(r["method"], r["size"], r["variant"]): r for r in rows if "error" not in r}
    for r in rows:
        base = by.get((r["method"], r["size"], "full")) or by.get((r["method"], r["size"], "cached"))
        if base and "error" not in r:
            r["speed_vs_first"] = base["s_per_step"] / r["s_per_step"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(device=device, args=vars(args), rows=rows), indent=1))
    lines = [f"Device: {device}; mixed precision: {args.mixed_precision}; {args.pairs} pair(s) per step; "
             f"{args.steps} timed steps after {args.warmup} warm-up.", "",
             "| method | size | variant | s/step | throughput | peak memory (GiB) | speed vs. full | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['size']} | {r['variant']} | failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.0f} %" if "mfu" in r else "–"
        ratio = f"{r['speed_vs_first']:.2f}x" if "speed_vs_first" in r else "–"
        lines.append(f"| {r['method']} | {r['size']} | {r['variant']} | {r['s_per_step']:.3f} | {r['items_per_s']:.2f} {r['unit']}/s | {r['peak_gib']:.2f} | {ratio} | {mfu} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
