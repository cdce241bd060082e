"""Hardening (issue 16): broken copies of every data layout through the loaders and the scripts that read them,
`kill -9` then --resume for dpok.py, sft.py and reward_model.py, and the run-folder rules.

Each broken copy is the toy world's data with a few rows damaged (or all of them): the loaders must skip and count a
few broken rows in their one summary line, stop with an error naming the column when most are broken, and keep
exactly the rows of the clean data minus the broken ones. Tiny budgets throughout: the file runs in a few minutes
on one core.

    python -m pytest tests/test_hardening.py
"""

import dataclasses
import itertools
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from common.data import image_bytes, load_binary, load_pairs
from common.runtime import list_checkpoints

REPO = Path(__file__).resolve().parent.parent
FEW = [3, 10, 17]  # the damaged rows of a "few broken" copy: non-adjacent, within what any tiny run reads
LAYOUT_FILES = {"pickapic": "train/part-0.parquet", "imagereward": "metadata-train.parquet",
                "binary": "train.parquet"}


# ---------------------------------------------------------------- broken copies of the toy layouts


def set_cells(table: pa.Table, column: str, rows, value, as_text: bool = False) -> pa.Table:
    """`table` with `column`[r] = value for r in rows; with as_text the whole column is rewritten as text first
    (numbers as "1.0", "2", the way a CSV turned parquet holds them)."""
    cells = table.column(column).to_pylist()
    if as_text:
        cells = [None if c is None else str(c) for c in cells]
    for r in rows:
        cells[r] = value
    kind = pa.string() if as_text or isinstance(value, str) else table.schema.field(column).type
    return table.set_column(table.schema.get_field_index(column), column, pa.array(cells, type=kind))


def copy_layout(world, layout: str, root: Path, table: pa.Table | None = None) -> Path:
    """A copy of the toy `layout` under root/<layout> whose training file holds `table` (default: the clean one)."""
    src, dst = Path(getattr(world, layout)), root / layout
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("images"))
    if (src / "images").exists():  # copied: a symlink out of the data set makes every image_path a broken row
        shutil.copytree(src / "images", dst / "images")
    if table is not None:
        pq.write_table(table, dst / LAYOUT_FILES[layout])
    return dst


def clean_table(world, layout: str) -> pa.Table:
    return pq.read_table(Path(getattr(world, layout)) / LAYOUT_FILES[layout])


def without(table: pa.Table, rows) -> pa.Table:
    return table.take([i for i in range(table.num_rows) if i not in set(rows)])


# layout, damage (table -> table), the reason the summary line must give
CASES = {
    "pickapic-null-label": ("pickapic", lambda t: set_cells(t, "label_0", FEW, None), "null label_0"),
    "pickapic-out-of-range": ("pickapic", lambda t: set_cells(set_cells(t, "label_0", FEW, 2.0), "label_1", FEW, 7.0),
                              "label pair not (1, 0), (0, 1) or (0.5, 0.5)"),
    "pickapic-non-numeric": ("pickapic", lambda t: set_cells(t, "label_1", FEW, "one", as_text=True),
                             "non-numeric label_1"),
    "pickapic-empty-caption": ("pickapic", lambda t: set_cells(t, "caption", FEW, " "), "empty caption"),
    "imagereward-null-rank": ("imagereward", lambda t: set_cells(t, "rank", FEW, None), "null rank"),
    "imagereward-negative-rank": ("imagereward", lambda t: set_cells(t, "rank", FEW, -1),
                                  "rank not a whole number >= 1"),
    "imagereward-#1-rank": ("imagereward", lambda t: set_cells(t, "rank", FEW, "#1", as_text=True),
                            "non-numeric rank"),
    "imagereward-empty-prompt": ("imagereward", lambda t: set_cells(t, "prompt", FEW, ""), "empty prompt"),
    # issue 24: no group to rank within (it pooled every such row into one prompt), and paths that leave the data set
    "imagereward-null-prompt-id": ("imagereward", lambda t: set_cells(t, "prompt_id", FEW, None), "null prompt_id"),
    "imagereward-relative-escape": ("imagereward", lambda t: set_cells(t, "image_path", FEW, "images/../../../etc/passwd"),
                                    "image_path outside the data set"),
    "imagereward-absolute-path": ("imagereward", lambda t: set_cells(t, "image_path", FEW, "/etc/passwd"),
                                  "image_path outside the data set"),
    "binary-null-label": ("binary", lambda t: set_cells(t, "label", FEW, None), "null label"),
    "binary-out-of-range": ("binary", lambda t: set_cells(t, "label", FEW, 2), "label not 0 or 1"),
    "binary-non-numeric": ("binary", lambda t: set_cells(t, "label", FEW, "good", as_text=True),
                           "non-numeric label"),
    "binary-empty-prompt": ("binary", lambda t: set_cells(t, "prompt", FEW, ""), "empty prompt"),
}


def load(layout: str, source: Path, **kw):
    """The loader every script calls for `layout` (diffusion_dpo.py, sft.py, reward_model.py: load_pairs;
    reward_model.py --loss binary: load_binary), with the scripts' default --max-broken-fraction."""
    if layout == "binary":
        return load_binary(str(source), "train", **kw)
    return load_pairs(layout, str(source), "train", **kw)


def content(layout: str, data) -> list[tuple]:
    """What reaches training, comparable across copies: captions, labels, and the images' bytes or zip paths."""
    if layout == "binary":
        return list(zip(data["prompt"], data["label"], data["image"]))
    if layout == "pickapic":
        return [(p.caption, image_bytes(p.image_w), image_bytes(p.image_l), p.tie) for p in data]
    return [(p.caption, p.image_w.args[1], p.image_l.args[1], p.tie) for p in data]  # image_path inside the zip


def expected_summary(layout: str, source: Path, clean: pa.Table, reason: str) -> str:
    """The summary line, counted here from the clean table independently of common/data.py."""
    kept_rows = without(clean, FEW)
    n = clean.num_rows
    if layout == "pickapic":
        ties = sum(a == b == 0.5 for a, b in zip(kept_rows["label_0"].to_pylist(), kept_rows["label_1"].to_pylist()))
        return (f"pickapic train ({source}): {n} rows read, {n - 3 - ties} kept, {ties} ties dropped, "
                f"3 broken skipped (3 {reason})")
    if layout == "binary":
        return f"binary train ({source}): {n} rows read, {n - 3} kept, 3 broken skipped (3 {reason})"
    groups: dict[str, list[int]] = {}
    for pid, rank in zip(kept_rows["prompt_id"].to_pylist(), kept_rows["rank"].to_pylist()):
        groups.setdefault(pid, []).append(rank)
    combos = [(a, b) for ranks in groups.values() for a, b in itertools.combinations(ranks, 2)]
    ties = sum(a == b for a, b in combos)
    return (f"imagereward train ({source}) images: {n} rows read, {n - 3} kept, 3 broken skipped (3 {reason}) -> "
            f"{len(combos) - ties} pairs, {ties} tied pairs dropped")


@pytest.mark.parametrize("case", list(CASES))
def test_a_few_broken_rows_are_skipped_counted_and_never_reach_training(world, tmp_path, caplog, case):
    layout, damage, reason = CASES[case]
    clean = clean_table(world, layout)
    broken = copy_layout(world, layout, tmp_path / "broken", damage(clean))
    with caplog.at_level(logging.INFO, logger="common.data"):
        got = load(layout, broken)
    records = [r for r in caplog.records if r.name == "common.data"]
    assert [r.getMessage() for r in records] == [expected_summary(layout, broken, clean, reason)]
    assert records[0].levelno == logging.WARNING  # something was skipped: visible without INFO logging
    expected = load(layout, copy_layout(world, layout, tmp_path / "clean", without(clean, FEW)))
    assert content(layout, got) == content(layout, expected)


MANY = {  # every row (binary: every other row) broken: the column was misread; the error names file, column,
    # the reasons and the first rows. {n}: the clean table's rows, {b}: the broken ones.
    "pickapic": (lambda t: set_cells(t, "label_0", range(t.num_rows), None),
                 "{src} (split train), label_0/label_1: {b} of {n} rows have unusable labels ({b} null label_0); "
                 "first rows [0, 1, 2, 3, 4]. More than --max-broken-fraction 0.01 of the rows"),
    "imagereward": (lambda t: set_cells(t, "rank", range(t.num_rows), "#1", as_text=True),
                    "{src}/metadata-train.parquet, column rank: {b} of {n} rows have unusable labels ({b} "
                    "non-numeric rank); first rows [0, 1, 2, 3, 4]. More than --max-broken-fraction 0.01"),
    "binary": (lambda t: set_cells(t, "label", range(0, t.num_rows, 2), "good", as_text=True),
               "{src} (split train), column label: {b} of {n} rows have unusable labels ({b} non-numeric label); "
               "first rows [0, 2, 4, 6, 8]. More than --max-broken-fraction 0.01"),
}


def many_message(layout: str, src: Path, n: int) -> str:
    return re.escape(MANY[layout][1].format(src=src, n=n, b=(n + 1) // 2 if layout == "binary" else n))


@pytest.mark.parametrize("layout", list(MANY))
def test_many_broken_rows_stop_with_the_column_named(world, tmp_path, layout):
    clean = clean_table(world, layout)
    src = copy_layout(world, layout, tmp_path, MANY[layout][0](clean))
    with pytest.raises(ValueError, match=many_message(layout, src, clean.num_rows)):
        load(layout, src)
    kept = clean.num_rows // 2 if layout == "binary" else 0
    assert len(load(layout, src, max_broken=1.0)) == kept  # the bar is the flag


@pytest.mark.parametrize("layout", ["pickapic", "imagereward", "binary"])
def test_empty_and_unreadable_files_are_named(world, tmp_path, layout):
    src = copy_layout(world, layout, tmp_path)
    file = src / LAYOUT_FILES[layout]
    file.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{file}: empty file (0 bytes), not a parquet file")):
        load(layout, src)
    file.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=re.escape(f"{file}: not a readable parquet file")):
        load(layout, src)
    pq.write_table(clean_table(world, layout).slice(0, 0), file)
    with pytest.raises(ValueError, match=re.escape(f"{file}: 0 rows for split")):
        load(layout, src)


# ---------------------------------------------------------------- the same copies through each script


def corrupt_rows(clean: pa.Table) -> list[int]:
    """Two non-tie rows after FEW, not adjacent once ties and FEW are dropped: their images are replaced by junk."""
    labels = clean["label_0"].to_pylist()
    candidates = [r for r in range(20, 60) if labels[r] != 0.5]
    return [candidates[0], candidates[5]]


def kept_index(clean: pa.Table, row: int) -> int:
    """Position of a raw row among the kept pairs (FEW and ties dropped), computed from the table alone."""
    labels = clean["label_0"].to_pylist()
    return sum(1 for r in range(row) if r not in FEW and labels[r] != 0.5)


def run_script(script: str, src: Path, out: Path, cache: Path):
    if script == "diffusion_dpo":
        import diffusion_dpo as dd

        return dd.main(dd.parse_args(["--toy", "--steps", "4", "--per-device-batch", "16", "--max-pairs", "64",
                                      "--log-every", "1", "--eval-pairs", "8", "--num-validation-prompts", "0",
                                      "--reward-seeds", "0", "--dataset-source", str(src), "--output-dir", str(out)]))
    if script == "sft":
        import sft

        steps = len(load_pairs("pickapic", str(src), "train")) // 64  # one epoch (the last partial batch dropped)
        return sft.main(dataclasses.replace(
            sft.toy_defaults(), data="preferred", dataset_source=str(src), per_device_batch=64, grad_accum=1,
            steps=steps, log_every=1, checkpoint_every=1000, sample_every=1000, num_validation_prompts=0,
            reward_seeds=0, output_dir=str(out)))
    import reward_model as rm

    return rm.main(rm.toy_args(dataset=("pickapic",), dataset_source=(f"pickapic={src}",), steps=20, eval_every=1000,
                               output_dir=str(out), cache_dir=str(cache)))


@pytest.mark.parametrize("script", ["diffusion_dpo", "sft", "reward_model"])
def test_each_script_counts_broken_rows_and_images_exactly(world, tmp_path, caplog, capsys, script):
    """A Pick-a-Pic copy with 3 null labels and 2 pairs whose images do not decode: the summary line in the log,
    and every undecodable image counted in the run's total (not only on logged steps)."""
    clean = clean_table(world, "pickapic")
    table = set_cells(clean, "label_0", FEW, None)
    bad = corrupt_rows(clean)
    for column in ("jpg_0", "jpg_1"):  # both images, so it is the winner whichever way the label points
        table = set_cells(table, column, bad, b"not an image")
    src = copy_layout(world, "pickapic", tmp_path, table)
    with caplog.at_level(logging.INFO):
        result = run_script(script, src, tmp_path / "run", tmp_path / "cache")
    assert expected_summary("pickapic", src, clean, "null label_0") in caplog.text
    undecodable = [r for r in caplog.records if "decod" in r.getMessage() and r.levelno == logging.WARNING]
    if script == "diffusion_dpo":  # 4 steps x 16 = the 64 pairs once: each broken pair is visited, then replaced
        assert result["skipped_pairs_total"] == len(undecodable) == 2
    elif script == "sft":  # one epoch in the order randperm(n, seed): the broken winners it visits, each once
        n = len(load_pairs("pickapic", str(src), "train"))
        visited = set(torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 64 * 64].tolist())
        expected = sum(kept_index(clean, r) in visited for r in bad)
        assert result["skipped_images_total"] == len(undecodable) == expected
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["charts/skipped_images_total"] == expected
    else:  # every pair is embedded once: the 2 pairs are dropped from training
        kept = clean.num_rows - 3 - sum(v == 0.5 for v in without(clean, FEW)["label_0"].to_pylist())
        assert f"pickapic train: skipped 2 of {kept} pairs with an undecodable image" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["diffusion_dpo", "sft", "reward_model"])
def test_each_script_stops_on_a_misread_label_column(world, tmp_path, script):
    clean = clean_table(world, "pickapic")
    src = copy_layout(world, "pickapic", tmp_path, MANY["pickapic"][0](clean))
    with pytest.raises(ValueError, match=many_message("pickapic", src, clean.num_rows)):
        run_script(script, src, tmp_path / "run", tmp_path / "cache")


def test_missing_members_of_the_imagereward_zip_are_counted_by_pair(world, tmp_path, capsys, caplog):
    """Two images missing from train_1.zip: reward_model.py drops exactly the non-tie pairs they belong to, and
    logs why (a KeyError from the zip) for each."""
    import reward_model as rm

    src = tmp_path / "imagereward"
    shutil.copytree(world.imagereward, src)
    meta = clean_table(world, "imagereward")
    gone = {meta["image_path"][4].as_py(), meta["image_path"][9].as_py()}
    archive = src / "images" / "train" / "train_1.zip"
    with zipfile.ZipFile(world.imagereward / "images" / "train" / "train_1.zip") as old, \
            zipfile.ZipFile(archive, "w") as new:
        for member in old.infolist():
            if f"images/train/{member.filename}" not in gone:
                new.writestr(member, old.read(member))
    rows = meta.select(["prompt_id", "rank", "image_path"]).to_pylist()
    pairs = [(a, b) for a, b in itertools.combinations(rows, 2) if a["prompt_id"] == b["prompt_id"]
             and a["rank"] != b["rank"]]
    lost = sum(a["image_path"] in gone or b["image_path"] in gone for a, b in pairs)
    with caplog.at_level(logging.WARNING):
        rm.main(rm.toy_args(dataset_source=(f"imagereward={src}",), steps=20, eval_every=1000, output_dir=str(tmp_path / "run"),
                            cache_dir=str(tmp_path / "cache")))
    assert f"imagereward train: skipped {lost} of {len(pairs)} pairs with an undecodable image" in \
        capsys.readouterr().out
    assert sum("undecodable image skipped (KeyError" in r.getMessage() for r in caplog.records) == lost


def test_single_file_source_has_no_held_out_evaluation(world, tmp_path, capsys):
    import diffusion_dpo as dd

    file = world.pickapic / "train" / "part-0.parquet"
    summary = dd.main(dd.parse_args(["--toy", "--steps", "1", "--per-device-batch", "4", "--max-pairs", "8",
                                     "--num-validation-prompts", "0", "--reward-seeds", "0", "--dataset-source",
                                     str(file), "--output-dir", str(tmp_path / "run")]))
    out = capsys.readouterr().out
    assert f"--dataset-source {file} is a single parquet file, so it has no held-out split" in out
    assert "0 held-out pairs" in out and "no held-out evaluation (no held-out split)" in out
    assert not any(k.startswith("eval/") for k in summary)
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == summary
    run_load_line(out, "load the result with:", tmp_path)  # from another folder, as printed


# ---------------------------------------------------------------- run folders, resume arguments, start-up checks


def start(script: str, out: Path, *flags: str):
    """The script's main on the toy world with the given extra flags (no training happens before the checks)."""
    import importlib

    module = importlib.import_module(script)
    argv = ["--toy", "--output-dir", str(out), *flags]
    if script == "reward_model":
        import tyro

        return module.main(tyro.cli(module.Args, args=argv, default=module.toy_args()))
    return module.main(module.parse_args(argv))


@pytest.mark.parametrize("script", ["diffusion_dpo", "dpok", "sft", "reward_model"])
def test_a_used_output_dir_is_refused_without_resume_or_overwrite(world, tmp_path, script):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(FileExistsError, match=re.escape(f"--output-dir {tmp_path} is not empty (metrics.jsonl): "
                                                        "pass --resume to continue that run, --overwrite")):
        start(script, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_checks_arguments_and_the_script_that_wrote_the_checkpoint(world, tmp_path):
    import sft

    quick = ["--steps", "3", "--per-device-batch", "4", "--max-pairs", "16", "--num-validation-prompts", "0",
             "--reward-seeds", "0", "--eval-pairs", "4"]
    out = tmp_path / "run"
    assert start("diffusion_dpo", out, *quick, "--stop-at-step", "1") == {"stopped_at": 1}
    with pytest.raises(ValueError, match=r"run-defining arguments differ from the checkpoint's run: "
                                         r"--per-device-batch 4 -> 8; --seed 0 -> 1\."):
        start("diffusion_dpo", out, *quick, "--resume", "--seed", "1", "--per-device-batch", "8")
    args_json = (out / "args.json").read_text()
    with pytest.raises(ValueError, match=re.escape(f"{out / 'checkpoints' / 'step_0000001'} is a checkpoint of "
                                                   "diffusion_dpo.py, not of sft.py")):
        sft.main(dataclasses.replace(sft.toy_defaults(), data="preferred", output_dir=str(out), resume=True,
                                     num_validation_prompts=0))
    assert (out / "args.json").read_text() == args_json  # nothing rewritten by the refused runs
    start("diffusion_dpo", out, *quick, "--overwrite")  # a fresh run in the same folder: the old one is gone
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 3
    assert [p.name for p in list_checkpoints(out)] == ["step_0000003"]  # the new run's last; not the old run's 1
    assert (out / "eval.json").exists()


@pytest.mark.parametrize("script", ["diffusion_dpo", "sft"])
def test_missing_model_path_and_bad_resolution_fail_before_the_data_loads(world, tmp_path, script):
    with pytest.raises(FileNotFoundError, match=r"--model /no/such/pipeline: no such local folder"):
        start(script, tmp_path / "a", "--model", "/no/such/pipeline", "--dataset-source", "/no/such/data")
    with pytest.raises(ValueError, match=r"--resolution 36: must be a positive multiple of 8"):
        start(script, tmp_path / "b", "--resolution", "36", "--dataset-source", "/no/such/data")


def test_two_runs_building_the_same_generated_set_do_not_collide(world, tmp_path):
    """sft.py's generated set is written into a run's own folder and renamed into place: a second run that
    completes the same set meanwhile (simulated by running it inside the first's sampling) leaves both intact."""
    import sft
    from diffusers import StableDiffusionPipeline
    from common.runtime import Dist
    from common.scorers import load_scorer

    args = dataclasses.replace(sft.toy_defaults(), num_images=8, per_device_batch=4, sample_steps=2,
                               generated_dir=str(tmp_path / "gen"))
    pipe = StableDiffusionPipeline.from_pretrained(world.pipeline, safety_checker=None, requires_safety_checker=False)
    scorer, dist, prompts = load_scorer("toy"), Dist(0, 1, 0, torch.device("cpu")), sft.load_prompts(args.prompts)
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    real_generate, inner = sft.generate, []

    def generate(*a, **k):
        if not inner:  # the first batch of the first run: a concurrent run builds the same set from start to end
            inner.append(None)
            inner[0] = sft.generated_set(args, pipe, scorer, prompts, dist, autocast)
            # the first run's half-written part file survived the second run (it used to be wiped mid-write)
            inner.append([f.name for f in (tmp_path / "gen").glob("*.tmp-*/part-*.parquet")])
        return real_generate(*a, **k)

    sft.generate = generate
    try:
        first = sft.generated_set(args, pipe, scorer, prompts, dist, autocast)
    finally:
        sft.generate = real_generate
    assert inner[1] == ["part-00000.parquet"]
    assert first == inner[0] and (first / "meta.json").exists()
    assert [p.name for p in (tmp_path / "gen").iterdir()] == [first.name]  # the loser's private folder is gone
    rows, rewards = sft.load_generated(first)
    assert len(rows) == len(rewards) == 8


# ---------------------------------------------------------------- kill -9, then --resume


# Runs a script as __main__ and SIGKILLs it inside the write of checkpoint `kill_at`, half-way through its first
# weights file: the process dies at a random step with a half-written checkpoint on disk.
DRIVER = r"""
import os, runpy, signal, sys
import common.runtime as runtime
script, kill_at = sys.argv[1], int(sys.argv[2])
real_save_file = runtime.save_file
def save_file(tensors, path):
    if os.path.basename(os.path.dirname(path)) == f".tmp-step_{kill_at:07d}":
        with open(path, "wb") as f:
            f.write(b"half a safetensors file")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save_file(tensors, path)
runtime.save_file = save_file
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def kill_during_checkpoint(script: str, kill_at: int, argv: list[str], out: Path, every: int = 1) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER, script, str(kill_at), *argv], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{kill_at - every:07d}"
    assert (checkpoints / f".tmp-step_{kill_at:07d}").is_dir()  # the half-written one, passed over on resume
    assert not (out / "final").exists()


def jsonl(path: Path, drop: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != drop} for line in path.read_text().splitlines()]


def assert_same_rows(a: list[dict], b: list[dict], why: str) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b], why
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-12), (why, x["step"])


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-8, msg=k)


def run_load_line(stdout: str, marker: str, cwd: Path) -> None:
    """The line printed after `marker`, pasted into Python in another folder, loads the result."""
    lines = stdout.splitlines()
    line = lines[next(i for i, s in enumerate(lines) if marker in s) + 1].strip()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", line], cwd=cwd, env=env, check=True, capture_output=True)


def test_kill9_dpok_resumes_to_the_uninterrupted_result(world, tmp_path, capsys):
    import dpok

    kill_at = 2 * random.randint(2, 4)  # a checkpoint every iteration of 2 policy steps
    tiny = ["--toy", "--lora-rank", "4", "--learning-rate", "1e-3", "--sample-batch", "4", "--rollout-steps", "3", "--buffer-size",
            "24", "--policy-steps", "2", "--policy-batch", "4", "--grad-accum", "2", "--value-steps", "2",
            "--value-batch", "8", "--num-validation-prompts", "2", "--sample-every", "100", "--checkpoint-every", "2",
            "--steps", "10"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    dpok.main(dpok.parse_args([*tiny, "--output-dir", str(whole)]))
    printed = capsys.readouterr().out
    kill_during_checkpoint("dpok.py", kill_at, [*tiny, "--output-dir", str(cut)], cut, every=2)
    dpok.main(dpok.parse_args([*tiny, "--output-dir", str(cut), "--resume"]))
    train = lambda out: [r for r in jsonl(out / "metrics.jsonl", "charts/seconds_per_iteration")  # noqa: E731
                         if "losses/loss" in r]
    assert_same_rows(train(cut), train(whole), f"killed at step {kill_at}")
    assert json.loads((cut / "eval.json").read_text()) == json.loads((whole / "eval.json").read_text())
    lora = Path("final/lora/pytorch_lora_weights.safetensors")
    assert_same_weights(whole / lora, cut / lora)
    run_load_line(printed, "load with:", tmp_path)


def test_kill9_sft_resumes_to_the_uninterrupted_result(world, tmp_path, capsys):
    kill_at = random.randint(2, 5)
    flags = ["--toy", "--data", "preferred", "--per-device-batch", "8", "--grad-accum", "1", "--steps", "6",
             "--checkpoint-every", "1", "--log-every", "1", "--sample-every", "1000", "--num-validation-prompts", "0",
             "--reward-seeds", "0"]
    import sft

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    sft.main(sft.parse_args([*flags, "--output-dir", str(whole)]))
    printed = capsys.readouterr().out
    kill_during_checkpoint("sft.py", kill_at, [*flags, "--output-dir", str(cut)], cut)
    sft.main(sft.parse_args([*flags, "--output-dir", str(cut), "--resume"]))
    drop = "charts/images_per_second"
    assert_same_rows(jsonl(cut / "metrics.jsonl", drop), jsonl(whole / "metrics.jsonl", drop), f"killed at {kill_at}")
    assert json.loads((cut / "eval.json").read_text()) == json.loads((whole / "eval.json").read_text())
    unet = Path("final/unet/diffusion_pytorch_model.safetensors")
    assert_same_weights(whole / unet, cut / unet)
    run_load_line(printed, "load the result with:", tmp_path)


def test_kill9_reward_model_resumes_to_the_uninterrupted_result(world, tmp_path, capsys):
    import reward_model as rm

    flags = ["--toy", "--steps", "20", "--checkpoint-every", "1", "--eval-every", "1000", "--log-every", "5",
             "--cache-dir", str(tmp_path / "cache")]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = rm.toy_args(steps=20, checkpoint_every=1, eval_every=1000, log_every=5, cache_dir=str(tmp_path / "cache"))
    rm.main(dataclasses.replace(args, output_dir=str(whole)))
    printed = capsys.readouterr().out
    total = int((whole / "checkpoints" / "latest").read_text()[5:])  # the run's last step
    kill_at = random.randint(2, total - 1)
    kill_during_checkpoint("reward_model.py", kill_at, [*flags, "--output-dir", str(cut)], cut)
    rm.main(dataclasses.replace(args, output_dir=str(cut), resume=True))
    drop = "charts/items_per_second"
    assert_same_rows(jsonl(cut / "metrics.jsonl", drop), jsonl(whole / "metrics.jsonl", drop),
                     f"killed at step {kill_at} of {total}")
    assert json.loads((cut / "eval.json").read_text()) == json.loads((whole / "eval.json").read_text())
    assert_same_weights(whole / "final" / "model.safetensors", cut / "final" / "model.safetensors")
    run_load_line(printed, "load it with:", tmp_path)


# ---------------------------------------------------------------- issue 24: paths, bytes and errors that say what is wrong


def test_a_symlink_out_of_the_data_set_is_a_broken_row_never_opened(world, tmp_path, caplog):
    """Three ways a link leads out of an ImageRewardDB copy: the image file, its zip, and a folder on the way. Each
    row is skipped and counted, and reading its path is refused before anything is opened."""
    import common.data

    clean = clean_table(world, "imagereward")
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "y.webp").write_bytes(b"secret")
    (outside / "secret.webp").write_bytes(b"secret")
    with zipfile.ZipFile(outside / "secret.zip", "w") as archive:
        archive.writestr("other_1/x.webp", b"secret")
    file_row = clean["image_path"][FEW[0]].as_py()  # images/train/train_1/<name>: an unzipped file wins over the zip
    table = set_cells(set_cells(clean, "image_path", FEW[1:2], "images/train/other_1/x.webp"),
                      "image_path", FEW[2:], "images/train/linked_1/y.webp")
    src = copy_layout(world, "imagereward", tmp_path / "broken", table)
    (src / file_row).parent.mkdir()
    (src / file_row).symlink_to(outside / "secret.webp")
    (src / "images" / "train" / "other_1.zip").symlink_to(outside / "secret.zip")
    (src / "images" / "train" / "linked_1").symlink_to(outside / "folder")
    with caplog.at_level(logging.INFO, logger="common.data"):
        got = load("imagereward", src)
    assert [r.getMessage() for r in caplog.records if r.name == "common.data"] == [
        expected_summary("imagereward", src, clean, "image_path outside the data set")]
    expected = load("imagereward", copy_layout(world, "imagereward", tmp_path / "clean", without(clean, FEW)))
    assert content("imagereward", got) == content("imagereward", expected)
    for path in (file_row, "images/train/other_1/x.webp", "images/train/linked_1/y.webp", "/etc/passwd",
                 "../other/x.webp"):
        with pytest.raises(ValueError, match=re.escape(f"image_path {path!r} leads outside the data set")):
            common.data.read_imagereward_image(str(src), path)
    assert image_bytes(got[0].image_w)  # the kept rows still read (from the zip)


def test_an_image_cell_with_only_a_path_is_a_broken_row(world, tmp_path, caplog):
    """A {'bytes', 'path'} image cell without bytes (binary layout): its path is never followed."""
    clean = clean_table(world, "binary")
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": "/etc/passwd"} if r in FEW else {"bytes": b, "path": None}
             for r, b in enumerate(clean["image"].to_pylist())]
    table = clean.set_column(clean.schema.get_field_index("image"), "image", pa.array(cells, type=kind))
    src = copy_layout(world, "binary", tmp_path, table)
    with caplog.at_level(logging.INFO, logger="common.data"):
        got = load("binary", src)
    n = clean.num_rows
    assert [r.getMessage() for r in caplog.records if r.name == "common.data"] == [
        f"binary train ({src}): {n} rows read, {n - 3} kept, 3 broken skipped (3 image cell with a path and no bytes)"]
    assert [image_bytes(image) for image in got["image"]] == without(clean, FEW)["image"].to_pylist()
    with pytest.raises(ValueError, match="holds no bytes, only the path '/etc/passwd': not opened"):
        image_bytes({"bytes": None, "path": "/etc/passwd"})


@pytest.mark.parametrize("layout, column", [("pickapic", "caption"), ("imagereward", "prompt"), ("binary", "prompt")])
def test_a_text_column_of_bytes_is_named_not_counted_as_empty(world, tmp_path, layout, column):
    clean = clean_table(world, layout)
    encoded = pa.array([t.encode() for t in clean[column].to_pylist()], type=pa.binary())
    src = copy_layout(world, layout, tmp_path, clean.set_column(clean.schema.get_field_index(column), column, encoded))
    with pytest.raises(ValueError, match=re.escape(f"column {column} holds bytes (binary, type binary), not text")) as e:
        load(layout, src)
    assert str(src) in str(e.value)


def test_a_prompts_file_that_is_not_utf8_is_named(tmp_path):
    from common.data import load_prompts

    file = tmp_path / "prompts.txt"
    file.write_bytes("a red cube\n".encode() + "a blue café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{file}: not UTF-8 text (byte b'\\xe9' at offset 21)")):
        load_prompts(str(file))


@pytest.mark.parametrize("error", ["ENOSPC", "iostream"])
def test_a_full_disk_during_a_checkpoint_is_named(tmp_path, monkeypatch, error):
    """The save fails as a full disk makes it fail: an OSError with errno ENOSPC (safetensors), or torch.save's C++
    `basic_ios::clear: iostream error`, which has no errno (then the free space decides). The user is told the disk
    is full and where; the half-written folder is removed and the previous checkpoint stays the latest."""
    import errno

    import common.runtime as runtime

    weights = {"w": {"a": torch.zeros(4)}}
    runtime.save_checkpoint(tmp_path, 4, weights, {})

    def full(*args, **kwargs):
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . basic_ios::clear: iostream error")

    monkeypatch.setattr(runtime, "save_file", full)
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(OSError, match=re.escape(
            f"no space left on device: checkpoint {checkpoints / 'step_0000005'} was not saved (the latest one, "
            f"{checkpoints / 'step_0000004'}, is intact). Free space on the disk of {checkpoints}")) as e:
        runtime.save_checkpoint(tmp_path, 5, weights, {})
    assert e.value.errno == errno.ENOSPC
    assert (checkpoints / "latest").read_text() == "step_0000004" and not list(checkpoints.glob(".tmp-*"))
    assert runtime.load_checkpoint(tmp_path)[0] == 4


def test_truncated_safetensors_scorer_weights_are_named(world, tmp_path):
    """A reward-model folder (dpok.py --scorer reward-model --scorer-path) and an aesthetic head whose .safetensors
    was cut short: the error names the file, where safetensors alone said `incomplete metadata`."""
    from safetensors.torch import save_file

    from common.scorers import RewardMLP, load_scorer, save_reward_model

    folder = tmp_path / "reward_model"
    save_reward_model(folder, RewardMLP(32, 16, 1), dict(clip=str(world.clip), embed_dim=32, hidden_dim=16,
                                                         num_hidden_layers=1))
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:40])
    head = tmp_path / "aesthetic.safetensors"
    save_file({"layers.0.weight": torch.zeros(1, 32)}, str(head))
    head.write_bytes(head.read_bytes()[:5])
    for name, path, named in (("reward-model", folder, file), ("aesthetic", head, head)):
        with pytest.raises(ValueError, match=re.escape(f"{named}: not a readable safetensors file, truncated or "
                                                       "damaged")):
            load_scorer(name, str(path), clip_path=str(world.clip), flags=("--scorer-path", "--clip-path"))


def test_a_reward_model_with_nan_weights_is_named_as_such(world, tmp_path, monkeypatch):
    """dpok.py on a reward model whose weights are NaN: the error says so and names --scorer-path, where the run
    used to stop on `the base model's validation rewards are all equal`. A scorer whose weights are finite but whose
    scores are not (an fp16 overflow) is named by dpok.py's reward scale and sft.py's weighting."""
    import dpok
    import sft

    from common.scorers import RewardMLP, save_reward_model

    head = RewardMLP(32, 16, 1)
    torch.nn.init.constant_(head.layers[0].weight, float("nan"))
    save_reward_model(tmp_path / "rm", head, dict(clip=str(world.clip), embed_dim=32, hidden_dim=16,
                                                  num_hidden_layers=1))
    with pytest.raises(ValueError, match=re.escape(f"scorer 'reward-model': its weights (--scorer-path "
                                                   f"{tmp_path / 'rm'}) hold NaN or inf values in 1 tensors")) as e:
        dpok.main(dpok.parse_args(["--toy", "--scorer", "reward-model", "--scorer-path", str(tmp_path / "rm"),
                                   "--output-dir", str(tmp_path / "run")]))
    assert "all equal" not in str(e.value)

    monkeypatch.setattr(dpok, "load_scorer", lambda *a, **k: lambda images, prompts: torch.full((len(prompts),),
                                                                                                float("nan")))
    with pytest.raises(ValueError, match=r"--scorer toy: 24 of the base model's 24 validation rewards are NaN or inf"):
        dpok.main(dpok.parse_args(["--toy", "--num-validation-prompts", "24", "--output-dir", str(tmp_path / "run2")]))
    with pytest.raises(ValueError, match=r"1 of the generated set's 3 rewards are NaN or inf"):
        sft.reward_weights(torch.tensor([0.5, float("nan"), 1.0]), "minmax", 0.5)


@pytest.mark.parametrize("script", ["diffusion_dpo", "dpok", "sft", "reward_model"])
def test_a_negative_learning_rate_is_refused_before_the_data_loads(world, tmp_path, script):
    missing = {"dpok": ["--prompts", "/no/such/prompts.txt"], "reward_model": ["--dataset-source",
                                                                                "imagereward=/no/such/data"]}
    with pytest.raises(ValueError, match=re.escape("--learning-rate must be > 0, got -0.0001")):
        start(script, tmp_path, "--learning-rate=-1e-4", *missing.get(script, ["--dataset-source", "/no/such/data"]))


@pytest.mark.parametrize("script", ["diffusion_dpo", "sft"])
def test_the_last_step_is_checkpointed_so_resume_can_extend_the_run(world, tmp_path, capsys, script):
    """--steps 3 --checkpoint-every 2 leaves a step-3 checkpoint (it used to stop at step 2), and --resume --steps 4
    continues from it to the same metrics and weights as 4 steps in one go."""
    flags = ["--checkpoint-every", "2", "--log-every", "1", "--per-device-batch", "4", "--num-validation-prompts",
             "0", "--reward-seeds", "0", *(["--max-pairs", "16", "--eval-pairs", "4"] if script == "diffusion_dpo"
                                           else ["--data", "preferred", "--grad-accum", "1"])]
    start(script, tmp_path / "whole", *flags, "--steps", "4")
    start(script, tmp_path / "cut", *flags, "--steps", "3")
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_0000002", "step_0000003"]
    capsys.readouterr()
    start(script, tmp_path / "cut", *flags, "--steps", "4", "--resume")
    assert f"resumed from step 3 of {tmp_path / 'cut'}" in capsys.readouterr().out
    drop = "charts/pairs_per_second" if script == "diffusion_dpo" else "charts/images_per_second"
    train = lambda out: [r for r in jsonl(out / "metrics.jsonl", drop) if "losses/loss" in r]  # noqa: E731
    assert_same_rows(train(tmp_path / "cut"), train(tmp_path / "whole"), "3 steps, then resumed to 4")
    unet = Path("final/unet/diffusion_pytorch_model.safetensors")
    assert_same_weights(tmp_path / "whole" / unet, tmp_path / "cut" / unet)


def test_a_hugging_face_cache_snapshot_is_one_data_set(world, tmp_path):
    """snapshot_download's folder holds symlinks into the repo's blobs/: those stay inside the data set."""
    repo = tmp_path / "datasets--THUDM--ImageRewardDB"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    (snapshot / "images" / "train").mkdir(parents=True)
    for name, link in (("meta", snapshot / "metadata-train.parquet"),
                       ("zip", snapshot / "images" / "train" / "train_1.zip")):
        shutil.copy(world.imagereward / link.relative_to(snapshot), repo / "blobs" / name)
        link.symlink_to(os.path.relpath(repo / "blobs" / name, link.parent))
    pairs = load("imagereward", snapshot)
    assert len(pairs) == len(load("imagereward", world.imagereward)) and image_bytes(pairs[0].image_w)


def test_truncated_scorer_weights_are_named(world, tmp_path):
    """A CLIP folder whose model.safetensors was cut short, and an ImageReward.pt that is not a checkpoint: the error
    names the scorer, the flag and the path, and says what to do, instead of safetensors' or torch's bare message."""
    import shutil

    from common.scorers import load_scorer

    clip = tmp_path / "clip"
    shutil.copytree(world.clip, clip)
    weights = clip / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    bad_pt = tmp_path / "ImageReward.pt"
    bad_pt.write_bytes(b"PK\x03\x04 half a download")
    for name, path in (("clip", clip), ("imagereward", bad_pt)):
        with pytest.raises(ValueError, match=rf"scorer '{name}': a weights file could not be read \(--scorer-path "
                                             rf"{re.escape(str(path))}.*truncated"):
            load_scorer(name, str(path), flags=("--scorer-path", "--clip-path"))
