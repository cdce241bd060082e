"""The one command for a lent GPU: every GPU row of the README, from random weights at the real shapes, in at most
10 minutes on one H100; writes benchmarks/results_gpu.md (and .json) with the device's name.

    python benchmarks/gpu.py                         # on one GPU; no hub, no network: weights are random
    python benchmarks/gpu.py --dry-run               # on a CPU: every row's code path at a tiny size (minutes)

Rows (ROWS below; adding one is one entry):
    Diffusion-DPO SD1.5 512 px, bf16, 1 pair/step: full fine-tune, LoRA + gradient checkpointing, and the
        --compile speed-up of the full fine-tune (benchmarks/bench.py's steps: pairs/s, peak memory, MFU)
    Diffusion-DPO SDXL 1024 px: LoRA + checkpointing, full fine-tune with Adafactor + checkpointing (bench.py)
    one DPOK iteration through dpok.py itself on the real-shape SD1.5 pipeline (benchmarks/real_shapes.py) with a
        PickScore-shaped scorer (CLIP ViT-H/14, random weights)
    one GRPO iteration through grpo.py (full and LoRA)
    ImageReward and HPS v2.1 scorer throughput at batch 64 (common/scorers.py, real architectures, random weights)

Each row runs in its own process (its peak memory is its own) and is either measured or marked "skipped: <why>":
a failure, a missing script, or the time budget (--budget-s) spent. The dry run uses the `toy` and `sdxl-toy`
bench sizes, a shrunken pipeline (real_shapes.pipeline(scale=0.1)) and tiny scorers; it checks the plumbing, not
the figures (tests/test_real_shapes.py runs it).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin (README)

import torch
import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class Args:
    dry_run: bool = False
    """every row at a tiny size on whatever device is here (a CPU): checks the code paths, not the figures"""
    out: str = "benchmarks/results_gpu.md"
    """markdown table written here (the rows as .json beside it)"""
    work_dir: str = "/tmp/gpu_bench"
    """where the real-shape pipeline and scorers are written (about 8 GB)"""
    budget_s: float = 570.0
    """rows that would start after this many seconds are skipped (the lent machine's 10-minute limit)"""
    steps: int = 10
    """timed optimizer steps per bench.py row (after --warmup)"""
    warmup: int = 3
    """untimed steps first (compilation happens here)"""


class Skip(Exception):
    """A row that cannot run here, with the reason the table prints."""


# ---------------------------------------------------------------- the rows
def bench_row(method: str, size: str, variant: str):
    """A row measured by benchmarks/bench.py's step for (method, size, variant), in its own process."""

    def row(args: Args, ctx: dict) -> dict:
        size_here = {"sd15": "toy", "sdxl": "sdxl-toy"}[size] if args.dry_run else size
        steps, warmup = (1, 0) if args.dry_run else (args.steps, args.warmup)
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--only", f"{method}/{size_here}/{variant}",
               "--device", ctx["device"], "--mixed-precision", "bf16" if ctx["device"] == "cuda" else "no",
               "--steps", str(steps), "--warmup", str(warmup)]
        r = _run(cmd)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            raise Skip(f"failed: {_last_line(r)}")
        res = json.loads(line[4:])
        ctx.setdefault("bench", {})[(method, size, variant)] = res
        return dict(throughput=f"{res['items_per_s']:.2f} {res['unit']}/s", peak=f"{res['peak_gib']:.1f} GiB",
                    mfu=f"{100 * res['mfu']:.0f} %" if "mfu" in res else "–", note=f"{res['s_per_step']:.3f} s/step")

    return row


def compile_speedup(args: Args, ctx: dict) -> dict:
    if args.dry_run:  # compiling even the toy UNet takes minutes on 2 CPU cores; bench.py's toy run covers the path
        raise Skip("skipped: dry run (torch.compile takes minutes on a CPU; benchmarks/bench.py --sizes toy runs it)")
    full = ctx.get("bench", {}).get(("dpo", "sd15", "full"))
    if full is None:
        raise Skip("skipped: the full fine-tune row did not run")
    res = bench_row("dpo", "sd15", "full+compile")(args, ctx)
    comp = ctx["bench"][("dpo", "sd15", "full+compile")]
    return {**res, "note": f"{full['s_per_step'] / comp['s_per_step']:.2f}x the eager full fine-tune "
                           f"({comp['s_per_step']:.3f} s/step)"}


def _pipeline(args: Args, ctx: dict) -> Path:
    """The real-shape SD1.5 pipeline (shrunk for a dry run), a PickScore-shaped scorer folder and a prompt file."""
    if "pipeline" not in ctx:
        from benchmarks import real_shapes

        work = Path(args.work_dir)
        scale = 0.1 if args.dry_run else 1.0
        ctx["pipeline"] = real_shapes.pipeline("sd15", work / "sd15", scale=scale)
        ctx["clip"] = real_shapes.clip_scorer(work / "clip", "tiny" if args.dry_run else "vit-h-14")
        (work / "prompts.txt").write_text("\n".join(real_shapes.CAPTIONS) + "\n")
    return ctx["pipeline"]


def script_iteration(script: str, flags: list[str], dry_flags: list[str], unit: str):
    """One iteration of a training script on the real-shape SD1.5 pipeline: wall time of the whole run (loading
    included) and the process's peak memory (torch.cuda.max_memory_allocated on a GPU)."""

    def row(args: Args, ctx: dict) -> dict:
        if not (REPO / script).is_file():
            raise Skip(f"skipped: {script} not present")
        model = _pipeline(args, ctx)
        work = Path(args.work_dir)
        argv = [script, "--model", str(model), "--prompts", str(work / "prompts.txt"), "--scorer", "pickscore",
                "--scorer-path", str(ctx["clip"]), "--clip-path", str(ctx["clip"]), "--output-dir",
                str(work / f"run_{Path(script).stem}"), "--overwrite",
                "--mixed-precision", "bf16" if ctx["device"] == "cuda" else "no",
                *(dry_flags if args.dry_run else flags)]
        code = ("import runpy, sys, time, torch; sys.argv = %r; t0 = time.perf_counter(); "
                "runpy.run_path(%r, run_name='__main__'); "
                "print('RESULT', time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30 "
                "if torch.cuda.is_available() else -1)") % (argv, str(REPO / script))
        r = _run([sys.executable, "-c", code])
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise Skip(f"failed: {_last_line(r)}")
        sec, peak = map(float, line.split()[1:])
        used = dry_flags if args.dry_run else flags
        return dict(throughput=f"{sec:.1f} s per {unit} (wall, with loading)",
                    peak=f"{peak:.1f} GiB" if peak >= 0 else "–", mfu="–", note=" ".join(used) or "defaults")

    return row


def scorer_throughput(name: str):
    """Images per second of a scorer at batch 64 on 512 px images, bf16 backbones (common/scorers.py's forward)."""

    def row(args: Args, ctx: dict) -> dict:
        code = ("import sys, json; sys.path.insert(0, %r); from benchmarks.gpu import time_scorer; "
                "print('RESULT', json.dumps(time_scorer(%r, %r, %r)))") % (str(REPO), name, args.dry_run,
                                                                        args.work_dir)
        r = _run([sys.executable, "-c", code])
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise Skip(f"failed: {_last_line(r)}")
        res = json.loads(line[7:])
        return dict(throughput=f"{res['images_per_s']:.1f} images/s", peak=f"{res['peak_gib']:.1f} GiB"
                    if res["peak_gib"] >= 0 else "–", mfu="–", note=f"batch {res['batch']}, {res['side']} px images")

    return row


def time_scorer(name: str, dry_run: bool, work_dir: str) -> dict:
    """Build the scorer at its real architecture (random weights; tiny in a dry run) and time it on one batch."""
    from benchmarks import real_shapes
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    batch, side = (4, 64) if dry_run else (64, 512)
    scorer = real_shapes.real_scorer(name, Path(work_dir), tiny=dry_run, dtype=dtype).to(dev).eval()
    images = torch.rand(batch, 3, side, side, device=dev)
    prompts = [real_shapes.CAPTIONS[i % len(real_shapes.CAPTIONS)] for i in range(batch)]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():
        scorer(images, prompts)  # warm-up
        sync()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reps = 1 if dry_run else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            s = scorer(images, prompts)
        sync()
    assert s.shape == (batch,) and bool(torch.isfinite(s).all()), f"{name}: scores {s}"
    return dict(images_per_s=batch * reps / (time.perf_counter() - t0), batch=batch, side=side,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else -1)


DPOK_DRY = ["--rollout-steps", "2", "--sample-batch", "2", "--policy-steps", "1", "--policy-batch", "1", "--grad-accum",
            "1", "--value-batch", "2", "--stat-min-count", "2", "--steps", "1", "--checkpoint-every", "1",
            "--sample-every", "1", "--reward-scale", "none", "--num-validation-prompts", "1", "--sample-steps", "2"]
# GRPO: one prompt's group of the official G = 16 trajectories of 50 steps, one optimizer step over their 49 trained
# steps each (the official iteration is 4 prompts per GPU: 4x this sampling and 2 steps of 32 trajectories).
GRPO_ONE = ["--sample-batch", "1", "--per-device-batch", "4", "--grad-accum", "4", "--steps", "1",
            "--checkpoint-every", "1", "--sample-every", "1", "--num-validation-prompts", "1", "--sample-steps", "2"]
GRPO_DRY = ["--rollout-steps", "2", "--group-size", "2", "--sample-batch", "1", "--per-device-batch", "2",
            "--grad-accum", "1", "--steps", "1", "--checkpoint-every", "1", "--sample-every", "1",
            "--num-validation-prompts", "1", "--sample-steps", "2", "--resolution", "64"]
# (README row name, function).
ROWS = [
    ("Diffusion-DPO SD1.5 512 px, full fine-tune", bench_row("dpo", "sd15", "full")),
    ("Diffusion-DPO SD1.5 512 px, LoRA + gradient checkpointing", bench_row("dpo", "sd15", "lora+ckpt")),
    ("Diffusion-DPO SD1.5 512 px, `--compile` speed-up (full)", compile_speedup),
    ("Diffusion-DPO SDXL 1024 px, LoRA + gradient checkpointing", bench_row("dpo", "sdxl", "lora+ckpt")),
    ("Diffusion-DPO SDXL 1024 px, full fine-tune, Adafactor + gradient checkpointing",
     bench_row("dpo", "sdxl", "full+adafactor+ckpt")),
    ("DPOK, one iteration (dpok.py, SD1.5 512 px, 5 policy steps)",
     script_iteration("dpok.py", ["--steps", "5", "--reward-scale", "none", "--num-validation-prompts", "1",
                                  "--sample-steps", "2"],
                     DPOK_DRY, "iteration")),
    ("GRPO, one iteration (grpo.py, SD1.5 512 px, G 16, full fine-tune)",
     script_iteration("grpo.py", GRPO_ONE, GRPO_DRY, "iteration")),
    ("GRPO, one iteration (grpo.py, SD1.5 512 px, G 16, LoRA rank 4)",
     script_iteration("grpo.py", GRPO_ONE + ["--lora-rank", "4"], GRPO_DRY + ["--lora-rank", "4"], "iteration")),
    ("ImageReward scorer, batch 64", scorer_throughput("imagereward")),
    ("HPS v2.1 scorer, batch 64", scorer_throughput("hps")),
]


# ---------------------------------------------------------------- running
def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sys.stderr.write(r.stderr[-2000:] if r.returncode else "")
    return r


def _last_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit status {r.returncode}").replace("|", "/")[:160]


def main(args: Args) -> None:
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    if not cuda and not args.dry_run:
        sys.exit("benchmarks/gpu.py: no GPU here; on a CPU run it with --dry-run (a check of the code paths)")
    ctx, results, t0 = {"device": "cuda" if cuda else "cpu"}, [], time.perf_counter()
    for name, fn in ROWS:
        start = time.perf_counter()
        if start - t0 > args.budget_s:
            res = dict(skipped=f"skipped: the time budget (--budget-s {args.budget_s:.0f}) was spent")
        else:
            try:
                res = fn(args, ctx)
            except Skip as e:
                res = dict(skipped=str(e))
        res.update(row=name, seconds=time.perf_counter() - start)
        results.append(res)
        print(json.dumps(res), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(device=device, dry_run=args.dry_run, rows=results), indent=1))
    kind = "dry run (tiny sizes, code paths only: not figures)" if args.dry_run else "random weights at the real shapes"
    lines = [f"Device: {device}; {kind}; `python benchmarks/gpu.py{' --dry-run' if args.dry_run else ''}`; "
             f"bf16 autocast on a GPU; {time.perf_counter() - t0:.0f} s in all.", "",
             "| row | throughput | peak memory | MFU | notes |", "|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['row']} | {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['row']} | {r['throughput']} | {r['peak']} | {r['mfu']} | {r['note']} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
