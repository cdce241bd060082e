"""evaluate.py with every scorer at its real architecture: the scorers' files in their download layouts, random
weights (benchmarks/real_shapes.py `scorer_files`), each read by common/scorers.py's loader exactly as the real ones.

Quick test (in the default `pytest`): HPS's file in OpenCLIP's layout at a tiny shape loads through load_scorer.

Slow test (marked `real_shapes`, run alone: one process of GiBs at a time): `benchmarks/real_shapes.py --models
--scorers hps imagereward pickscore aesthetic clip` writes the five scorers' files (9.4 GB); evaluate.py samples 2
prompts x 1 image from the real-shape SD1.5 (tests/conftest.py's real_sd15, built once for every real-shape file)
and a shrunken copy (evaluate.py compares at least two models), then scores those images once per scorer, one
process each, so each scorer's peak RSS is its own line in the log's PEAK MEMORY section (tests/conftest.py). 128 px
with 2 DDIM steps on a CPU (`REAL_SHAPES_RESOLUTION`), as tests/test_real_shapes.py.

    python -m pytest tests/test_real_shapes_eval.py -m real_shapes -n 0
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import real_shapes

REPO = Path(__file__).resolve().parent.parent
RES = int(os.environ.get("REAL_SHAPES_RESOLUTION", 512 if torch.cuda.is_available() else 128))
SCORERS = ("hps", "imagereward", "pickscore", "aesthetic", "clip")


def test_hps_file_in_openclips_layout_loads_at_a_tiny_shape(tmp_path):
    """HPS_v2.1_compressed.pt as the real one holds it ({"state_dict": OpenCLIP keys}, float16) at a tiny shape: the
    loader fills HPS's CLIPModel from it (the packed attention split in thirds, the projections transposed) and
    scores finitely."""
    from common.scorers import load_scorer

    state = real_shapes._random_state(real_shapes.openclip_shapes("tiny"), 0, torch.float16)
    assert all(v.dtype == torch.float16 for v in state.values())
    real_shapes._save_plain(tmp_path / "hps" / "HPS_v2.1_compressed.pt", {"state_dict": state})
    # the tiny shape's head counts (ViT-H/14's are the default without this file): 32 wide, 2 heads of 16
    (tmp_path / "hps" / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"vision_cfg": {"head_width": 16}, "text_cfg": {"heads": 2}}}))
    real_shapes._clip_processor("tiny").save_pretrained(tmp_path / "processor")
    scorer = load_scorer("hps", str(tmp_path / "hps"), clip_path=str(tmp_path / "processor"))
    model = scorer.backbone.model
    layer = model.vision_model.encoder.layers[1].self_attn
    packed = state["visual.transformer.resblocks.1.attn.in_proj_weight"].float()  # (3 D, D) = [W_q; W_k; W_v]
    assert torch.equal(layer.k_proj.weight, packed[32:64])
    assert torch.equal(model.text_projection.weight, state["text_projection"].float().T)
    with torch.no_grad():
        scores = scorer(torch.rand(2, 3, 48, 40), ["a cat in a hat", "a red circle on a white background"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.real_shapes
def test_evaluate_with_every_scorer_at_its_real_architecture(real_sd15, tmp_path, peak_memory):
    run = lambda cmd: real_shapes.run_measured([str(c) for c in cmd], REPO)  # noqa: E731  (code, log, peak GiB)
    code, log, peak = run([sys.executable, "benchmarks/real_shapes.py", "--out", tmp_path, "--models",
                           "--scorers", *SCORERS])
    assert code == 0, log[-3000:]
    peak_memory("benchmarks/real_shapes.py --scorers (all five)", peak)
    real_shapes.pipeline("sd15", tmp_path / "sd15_small", scale=0.25)  # the second model: seconds to build
    # toy-world prompts, so the sampling run can score with the toy reward (no weights) and its peak is the sampling's
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\na blue square on a black background\n")
    out = tmp_path / "eval"
    flags = [sys.executable, "evaluate.py", "--model", real_sd15, "--candidates",
             f"small={tmp_path / 'sd15_small'}", "--prompts", prompts, "--images-per-prompt", "1", "--sample-steps",
             "2", "--resolution", RES, "--per-device-batch", "4", "--rating-pairs", "0", "--n-resamples", "1000",
             "--mixed-precision", "fp16" if torch.cuda.is_available() else "no", "--output-dir", out]

    code, log, peak = run([*flags, "--scorers", "toy"])
    assert code == 0, log[-3000:]
    assert "sampling base" in log and "sampling small" in log
    peak_memory(f"evaluate.py sampling 2 prompts x 2 models, SD1.5 {RES} px, 2 steps (toy scorer)", peak)
    images = sorted((out / "images").rglob("*.png"))
    from PIL import Image

    assert len(images) == 4 and all(Image.open(f).size == (RES, RES) for f in images)
    drawn = {f: f.stat().st_mtime_ns for f in images}

    paths = real_shapes.scorer_paths(tmp_path / "scorers")
    for name in SCORERS:
        (out / "results.json").unlink()
        path, clip_path = paths[name]
        code, log, peak = run([*flags, "--scorers", name, "--scorer-paths", f"{name}={path}", "--clip-paths",
                               f"{name}={clip_path}"])
        assert code == 0, log[-3000:]
        peak_memory(f"evaluate.py scoring 4 images with {name} at its real architecture", peak)
        assert "sampling" not in log  # the images on disk were reused, untouched: this process only scored
        assert {f: f.stat().st_mtime_ns for f in images} == drawn
        results = json.loads((out / "results.json").read_text())
        for model in ("base", "small"):
            per_image = results["runs"][model]["per_image"][name]  # (2 prompts, 1 image)
            assert len(per_image) == 2 and all(len(row) == 1 and math.isfinite(row[0]) for row in per_image), per_image
