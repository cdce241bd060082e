"""Tests for common/runtime.py: exact resume, crash-safe checkpoints, metrics, guard rails, DDP helpers, grids."""

import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from common import runtime
from common.runtime import (
    MetricsLogger, all_reduce_mean, batch_arithmetic, check_finite, count_params, latest_checkpoint,
    list_checkpoints, load_checkpoint, rng_state, save_checkpoint, save_image_grid, seed_everything,
    set_rng_state, unwrap, write_args,
)


def draws(gen: torch.Generator) -> tuple:
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1), \
        np.random.randn(), torch.randn(4, generator=gen)


def assert_draws_equal(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:5] == b[2:5]
    torch.testing.assert_close(a[5], b[5], rtol=0, atol=0)


def make_run(seed=0):
    """A model after one AdamW + LR-scheduler step, so the optimizer has non-trivial state."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    model(torch.randn(3, 5)).pow(2).mean().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def train_step(model, opt, sched, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    sched.step()


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    seed_everything(123)
    gen = torch.Generator().manual_seed(7)
    model, opt, sched = make_run()
    draws(gen)  # move every stream off its seeded start, so restoring is not the same as re-seeding
    extra = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "note": Path("a/b"), "n": np.int64(3)}
    path = save_checkpoint(tmp_path, 10, {"model": model.state_dict()}, extra, generators=[gen])
    expected = draws(gen)
    x = torch.randn(3, 5)
    train_step(model, opt, sched, x)  # the uninterrupted run's next step

    seed_everything(999)  # a fresh process: other seeds, other weights
    gen2 = torch.Generator().manual_seed(1)
    model2, opt2, sched2 = make_run(seed=1)
    step, weights, extra2 = load_checkpoint(tmp_path)  # an output dir resolves `latest`
    assert step == 10 and latest_checkpoint(tmp_path) == path
    model2.load_state_dict(weights["model"])
    opt2.load_state_dict(extra2["optimizer"])
    sched2.load_state_dict(extra2["scheduler"])
    assert extra2["note"] == "a/b" and extra2["n"] == 3
    set_rng_state(extra2["rng"][0], generators=[gen2])
    assert_draws_equal(draws(gen2), expected)
    train_step(model2, opt2, sched2, x)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, p2, rtol=0, atol=0)
    assert sched.get_last_lr() == sched2.get_last_lr()
    # The state file is readable by the safe loader on its own.
    torch.load(path / "state.pt", weights_only=True)


def test_extra_that_would_need_pickle_is_rejected_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['bad'\]"):
        save_checkpoint(tmp_path, 1, {}, {"bad": object()})
    assert not (tmp_path / "checkpoints").exists()  # failed before writing anything


def test_crash_while_writing_weights_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = {"w": torch.arange(6.0)}
    save_checkpoint(tmp_path, 1, {"model": good}, {"tag": "good"})

    def crash(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"partial")  # half a file, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(runtime, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(6)}}, {"tag": "bad"})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    step, weights, extra = load_checkpoint(tmp_path)
    assert step == 1 and extra["tag"] == "good" and torch.equal(weights["model"]["w"], good["w"])

    monkeypatch.undo()  # the next save succeeds and clears the debris
    save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(6)}}, {"tag": "new"})
    assert load_checkpoint(tmp_path)[0] == 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_crash_while_moving_latest_pointer_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}}, {})
    real_replace = os.replace

    def crash_on_pointer(src, dst):
        if Path(dst).name == "latest":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(runtime.os, "replace", crash_on_pointer)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(2)}}, {})
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000001"
    step, weights, _ = load_checkpoint(tmp_path)
    assert step == 1 and torch.equal(weights["model"]["w"], torch.ones(2))


def test_keep_last_prunes_oldest(tmp_path):
    for step in [10, 20, 30, 40]:
        save_checkpoint(tmp_path, step, {"m": {"w": torch.full((2,), float(step))}}, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000030", "step_0000040"]
    # Resuming from 30 and saving 35: 40 belongs to the abandoned run and stays until overwritten.
    save_checkpoint(tmp_path, 35, {"m": {"w": torch.zeros(2)}}, {}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000035", "step_0000040"]
    assert load_checkpoint(tmp_path)[0] == 35
    save_checkpoint(tmp_path, 40, {"m": {"w": torch.ones(2)}}, {}, keep_last=None)  # overwrite in place
    assert torch.equal(load_checkpoint(tmp_path)[1]["m"]["w"], torch.ones(2))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_metrics_logger_jsonl_and_resume_truncation(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 11):
        log.log({"losses/loss": torch.tensor(1.0 / step), "charts/lr": 0.1}, step)
    log.log({"losses/loss": float("nan")}, 11)
    log.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 12))
    assert rows[3]["losses/loss"] == pytest.approx(0.25) and rows[-1]["losses/loss"] is None
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "losses/lo')  # torn by a crash mid-write

    log = MetricsLogger(tmp_path, enabled=True, resume_step=5)
    log.log({"losses/loss": 0.5}, 6)
    log.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert any((tmp_path / "tb").glob("events.out.tfevents.*"))

    MetricsLogger(tmp_path / "off", enabled=False).log({"x": 1.0}, 1)
    assert not (tmp_path / "off").exists()


def test_write_args_is_json(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class Args:
        output_dir: Path = Path("runs/x")
        betas: tuple[float, float] = (0.9, 0.999)
        loss: str = "sigmoid"
        sizes: list[int] = field(default_factory=lambda: [1, 2])

    write_args(tmp_path, Args())
    assert json.loads((tmp_path / "args.json").read_text()) == \
        {"output_dir": "runs/x", "betas": [0.9, 0.999], "loss": "sigmoid", "sizes": [1, 2]}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite(tmp_path, bad):
    check_finite(torch.tensor(0.3), step=5, output_dir=tmp_path)  # finite: silent
    with pytest.raises(FloatingPointError, match=r"at step 17;.*no checkpoint"):
        check_finite(torch.tensor(bad), step=17, output_dir=tmp_path)
    save_checkpoint(tmp_path, 15, {}, {})
    with pytest.raises(FloatingPointError, match=r"step 17; the last good checkpoint is intact at .*step_0000015"):
        check_finite(torch.tensor([1.0, bad]).detach(), step=17, output_dir=tmp_path)


def test_save_image_grid_size_and_content(tmp_path):
    images = torch.rand(5, 3, 8, 6)
    grid = save_image_grid(images, tmp_path / "g.png", nrow=3, upscale=4, padding=2)
    on_disk = Image.open(tmp_path / "g.png")
    assert on_disk.format == "PNG"
    assert on_disk.size == (3 * 6 * 4 + 4 * 2, 2 * 8 * 4 + 3 * 2)  # (W, H): 3 columns, 2 rows, padding around
    # Tile 4 (row 1, column 1), pixel (y=5, x=3) of the source lands at nearest-upscaled position.
    x0, y0 = 2 + 1 * (24 + 2), 2 + 1 * (32 + 2)
    expected = tuple((images[4, :, 5, 3] * 255).round().to(torch.uint8).tolist())
    assert on_disk.convert("RGB").getpixel((x0 + 3 * 4 + 1, y0 + 5 * 4 + 2)) == expected

    pil = [Image.new("RGB", (16, 16), (255, 0, 0)) for _ in range(2)]
    captioned = save_image_grid(pil, tmp_path / "c.png", nrow=2, captions=["a red square", "another red square"],
                                upscale=4)
    assert captioned.width == 2 * 64 + 3 * 2 and captioned.height > 64 + 2 * 2
    band = np.asarray(captioned)[2 + 64:captioned.height - 2]  # the caption strip under the tiles
    assert (band < 128).any(), "caption text was not drawn"


def test_small_helpers():
    assert batch_arithmetic(4, 8, 2) == 64
    with pytest.raises(ValueError, match="grad_accum=0"):
        batch_arithmetic(4, 1, 0)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    assert count_params(model) == 8 and count_params(model, trainable_only=True) == 6
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap(compiled) is model and list(unwrap(compiled).state_dict()) == ["weight", "bias"]
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


# ------------------------------------------------------------------------------------------------ two processes


def _worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist = runtime.setup_distributed()
    try:
        seed_everything(0, dist.rank)
        x = torch.tensor([float(rank + 1), 10.0 * rank])
        mean = all_reduce_mean(x, dist)
        # DDP only: torch.compile would import dynamo in each child (~6 s); test_small_helpers covers it.
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        save_checkpoint(out_dir, 3, {"m": unwrap(ddp).state_dict()}, {})
        after_save = torch.rand(3)
        _, weights, extra = load_checkpoint(out_dir)
        set_rng_state(extra["rng"][dist.rank])
        torch.save({"x": x, "mean": mean, "keys": sorted(weights["m"]), "dist": (dist.rank, dist.world_size,
                    dist.is_main, str(dist.device)), "resumed_equal": torch.equal(torch.rand(3), after_save)},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        runtime.cleanup_distributed()


def test_two_process_gloo(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on CPU even on a GPU machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    expected = (r0["x"] + r1["x"]) / 2
    torch.testing.assert_close(r0["mean"], expected)
    torch.testing.assert_close(r1["mean"], expected)
    assert r0["dist"] == (0, 2, True, "cpu") and r1["dist"] == (1, 2, False, "cpu")
    assert r0["keys"] == ["bias", "weight"]  # no `module.` prefix
    assert r0["resumed_equal"] and r1["resumed_equal"]  # each rank got its own RNG state back
    assert len(torch.load(tmp_path / "checkpoints/step_0000003/state.pt", weights_only=True)["rng"]) == 2


# ---------------------------------------------------------------- hardening (issue 16): incomplete checkpoints,
# run folders, resume arguments, another script's checkpoint, --model and --resolution at start-up


def test_half_written_step_folder_is_passed_over_for_the_last_complete_one(tmp_path):
    """A step folder in place but incomplete (killed mid-write on a filesystem without atomic rename, or copied
    half-way) and a torn `latest`: the newest checkpoint that loads wins, with a warning naming the one passed over."""
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": {"w": torch.full((4,), float(step))}}, {"s": step}, keep_last=None)
    weights_file = tmp_path / "checkpoints" / "step_0000003" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:20])  # truncated by the kill
    with pytest.warns(UserWarning, match=r"resuming from step_0000002; passed over incomplete step_0000003"):
        step, weights, extra = load_checkpoint(tmp_path)
    assert step == 2 and extra["s"] == 2 and torch.equal(weights["model"]["w"], torch.full((4,), 2.0))

    (tmp_path / "checkpoints" / "step_0000002" / "state.pt").unlink()  # killed before state.pt was written
    (tmp_path / "checkpoints" / "latest").write_text("")  # and the pointer torn
    with pytest.warns(UserWarning, match="resuming from step_0000001"):
        assert load_checkpoint(tmp_path)[0] == 1
    for p in list_checkpoints(tmp_path):
        (p / "state.pt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_checkpoint_of_another_script_is_named_not_a_key_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"policy": {"w": torch.ones(2)}}, {}, script="dpok.py")
    with pytest.raises(ValueError, match=r"is a checkpoint of dpok.py, not of sft.py"):
        load_checkpoint(tmp_path, script="sft.py")
    assert load_checkpoint(tmp_path, script="dpok.py")[0] == 1


def test_non_empty_output_dir_is_refused_unless_resuming_or_overwriting(tmp_path):
    runtime.prepare_output_dir(tmp_path / "new", resume=False)  # absent or empty: fine
    (tmp_path / "new").mkdir()
    runtime.prepare_output_dir(tmp_path / "new", resume=False)
    old = tmp_path / "old"
    for name in ("checkpoints/step_0000001", "samples", "tb", "final/unet", "latent_cache"):
        (old / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "eval.json", "args.json", "notes.txt"):
        (old / name).write_text("x")
    with pytest.raises(FileExistsError, match=r"--output-dir .*old is not empty \(args.json, checkpoints, eval.json, "
                                              r"final, latent_cache, metrics.jsonl, \.\.\.\): pass --resume"):
        runtime.prepare_output_dir(old, resume=False)
    runtime.prepare_output_dir(old, resume=True)  # resuming: the folder is the run's own
    assert (old / "metrics.jsonl").exists()
    runtime.prepare_output_dir(old, resume=False, overwrite=True)
    # only the run's outputs went, diffusion_dpo.py's own latent_cache/ with them (--overwrite leaves no stale cache)
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]


def test_resume_with_changed_run_defining_args_names_them():
    import dataclasses

    @dataclasses.dataclass
    class Args:
        seed: int = 0
        per_device_batch: int = 4
        steps: int = 10
        output_dir: str = "a"
        resume: bool = False

    saved = runtime._plain(Args(), keep_tensors=False)
    runtime.check_resume_args(saved, Args(steps=20, output_dir="b", resume=True))  # length and place may change
    with pytest.raises(ValueError, match=r"--per-device-batch 4 -> 8; --seed 0 -> 1\. Resume with the same"):
        runtime.check_resume_args(saved, Args(seed=1, per_device_batch=8, resume=True))
    runtime.check_resume_args({"seed": 0}, Args(resume=True))  # a flag the checkpoint predates is not compared


def test_model_path_and_resolution_checked_at_start_up(tmp_path):
    from common.toy import toy_world

    with pytest.raises(FileNotFoundError, match=r"--model /no/such/pipeline: no such local folder"):
        runtime.check_model_path("/no/such/pipeline")
    with pytest.raises(FileNotFoundError, match=r"--model runs/x/final/: no such local folder"):
        runtime.check_model_path("runs/x/final/")
    runtime.check_model_path("stable-diffusion-v1-5/stable-diffusion-v1-5")  # a hub id: left to the hub client
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        runtime.check_model_path(str(tmp_path))
    world = toy_world()
    runtime.check_model_path(str(world.pipeline))
    runtime.check_resolution(str(world.pipeline), 32)
    with pytest.raises(ValueError, match=r"--resolution 36: must be a positive multiple of 8 \(the VAE downsamples "
                                         r"by 4; .*\), e.g. 32"):
        runtime.check_resolution(str(world.pipeline), 36)
