"""Tests for AI feedback (`diffusion_dpo.py --relabel-with`, common.data.score_pairs / relabel_pairs): on toy
Pick-a-Pic data whose human labels were flipped for a known subset, the toy reward as the scorer flips exactly that
subset back; scorer ties keep jpg_0 as the winner, as the official code; a Diffusion-DPO run on scorer-labelled data (every human label reversed) still raises the toy reward.

    python -m pytest tests/test_relabel.py
"""

import dataclasses
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import diffusion_dpo as dd
from common.data import load_pairs, relabel_pairs, score_pairs
from common.runtime import Dist
from common.scorers import load_scorer
from common.toy import toy_reward


def write_flipped(world, root, flip_row) -> None:
    """The toy Pick-a-Pic train split with label_0 / label_1 swapped where flip_row(i); validation as is."""
    table = pq.read_table(world.pickapic / "train" / "part-0.parquet")
    flip = np.array([flip_row(i) for i in range(len(table))])
    label_0, label_1 = table.column("label_0"), table.column("label_1")
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0",
                             pc.if_else(flip, label_1, label_0))
    table = table.set_column(table.schema.get_field_index("label_1"), "label_1",
                             pc.if_else(flip, label_0, label_1))
    (root / "train").mkdir(parents=True)
    (root / "validation").mkdir()
    pq.write_table(table, root / "train" / "part-0.parquet")
    pq.write_table(pq.read_table(world.pickapic / "validation" / "part-0.parquet"),
                   root / "validation" / "part-0.parquet")


def test_the_toy_scorer_flips_back_exactly_the_flipped_subset(world, tmp_path):
    write_flipped(world, tmp_path / "data", lambda i: i % 3 == 1)
    pairs = load_pairs("pickapic", str(tmp_path / "data"), "train", max_pairs=120)  # human ties already dropped
    dist = Dist(0, 1, 0, torch.device("cpu"))
    path = tmp_path / "scores.safetensors"
    scores = score_pairs(pairs, load_scorer("toy"), 32, path, dist, batch_size=16)
    assert scores.shape == (120, 2) and path.exists()
    relabelled, stats = relabel_pairs(pairs, scores)

    rows = pairs.rows[relabelled.index]  # the parquet row of every kept pair
    flipped_rows = set(rows[relabelled.swap].tolist())
    assert flipped_rows == {int(r) for r in pairs.rows if r % 3 == 1}  # exactly the subset we flipped
    assert stats["flipped"] == len(flipped_rows) and stats["ties"] == 0 and stats["kept"] == 120
    assert stats["agreement"] == pytest.approx(1 - len(flipped_rows) / 120)
    # every relabelled pair's winner has the higher toy reward; the cached scores are read back unchanged
    from common.data import PairDataset
    data = PairDataset(relabelled, 32, random_flip=False, seed=0)
    for k in range(0, 120, 7):
        item = data[k]
        r = toy_reward(torch.stack([item["pixel_w"], item["pixel_l"]]) * 0.5 + 0.5, [item["caption"]] * 2)
        assert r[0] > r[1]
    assert torch.equal(score_pairs(pairs, None, 32, path, dist), scores)  # cached: no scorer needed


def test_pairs_are_scored_as_decoded_whatever_their_sizes(tmp_path):
    """resolution None (what diffusion_dpo.py uses): every image scored at its own size, uncropped, as the official
    choice models see jpg_0 / jpg_1; images of one size share a batch, and each score equals the image's own."""
    import io

    from PIL import Image

    from common.data import Pair
    from common.toy import PROMPTS

    rng = np.random.default_rng(0)
    sizes = [(24, 24), (20, 36), (24, 24), (36, 20), (20, 36), (24, 24), (24, 24)]
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    pairs = [Pair(PROMPTS[k], png(arrays[k]), png(arrays[k + 1])) for k in range(6)] + [Pair(PROMPTS[6], b"no", b"no")]
    scores = score_pairs(pairs, load_scorer("toy"), None, tmp_path / "s.safetensors", Dist(0, 1, 0, torch.device("cpu")),
                         batch_size=4)
    for k in range(6):
        for j in (0, 1):
            x = torch.from_numpy(arrays[k + j]).permute(2, 0, 1)[None].float() / 255
            assert scores[k, j] == toy_reward(x, [PROMPTS[k]])[0]
    assert torch.isnan(scores[6]).all()  # undecodable: NaN, dropped by relabel_pairs


def test_an_unknown_scorer_is_rejected_with_the_flag_named(world, tmp_path):
    with pytest.raises(ValueError, match="--relabel-with nonsense: unknown scorer"):
        dd.main(dataclasses.replace(dd.parse_args(["--toy", "--steps", "1", "--output-dir", str(tmp_path)]),
                                    relabel_with="nonsense"))  # past the parser, which knows the names too


def test_scorer_ties_keep_the_rows_first_image_as_the_winner(world):
    """As the official code (no swap unless s(jpg_1) > s(jpg_0)): a tie goes to jpg_0, whichever image the human
    preferred; a NaN (undecodable) pair is dropped; the raw scores decide (a scale or shift of one pair's two scores
    changes nothing)."""
    pairs = load_pairs("pickapic", str(world.pickapic), "train", max_pairs=40)
    a = int(np.flatnonzero(~pairs.swap)[0])  # the human preferred jpg_0
    b = int(np.flatnonzero(pairs.swap)[0])  # the human preferred jpg_1
    c, d, e = [k for k in range(40) if k not in (a, b)][:3]
    scores = torch.zeros(40, 2)
    scores[:, 0] = 1.0  # every other pair: the scorer agrees with the human
    scores[a] = scores[b] = torch.tensor([0.5, 0.5])  # ties
    scores[c] = torch.tensor([0.0, 2.0])  # the scorer prefers the human loser
    scores[d] = torch.tensor([-300.0, -200.0])  # the same, on another scale
    scores[e] = torch.tensor([float("nan"), 1.0])
    relabelled, stats = relabel_pairs(pairs, scores)
    kept = relabelled.index.tolist()
    assert e not in kept and len(kept) == 39
    assert not relabelled.swap[kept.index(a)] and relabelled.swap[kept.index(b)]  # jpg_0 wins both ties
    for k in (a, b):
        assert relabelled[kept.index(k)].image_w == pairs.ds[int(pairs.rows[k])]["jpg_0"]
    assert relabelled.swap[kept.index(c)] and relabelled.swap[kept.index(d)]
    assert relabelled[kept.index(c)].image_w == pairs[c].image_l and relabelled[kept.index(c)].image_l == pairs[c].image_w
    assert (stats["ties"], stats["undecodable"], stats["kept"], stats["flipped"]) == (2, 1, 39, 3)  # c, d, tie b
    assert stats["agreement"] == pytest.approx(35 / 37)  # of the 37 decided pairs, c and d disagree


def test_dpo_on_scorer_labelled_data_raises_the_toy_reward(world, tmp_path):
    """Every human label reversed: trained on them, DPO would shrink the shapes; relabelled by the toy reward, it
    learns the toy reward's preference again."""
    write_flipped(world, tmp_path / "data", lambda i: True)
    out = tmp_path / "run"
    summary = dd.main(dd.parse_args(["--toy", "--output-dir", str(out), "--dataset-source", str(tmp_path / "data"),
                                     "--relabel-with", "toy", "--num-validation-prompts", "0"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["data/relabel_agreement"] == 0.0  # the scorer disagrees with every label
    assert rows[0]["data/relabel_flipped"] == summary["relabel/kept"] == summary["train_pairs"]
    assert summary["eval/reward_final"] > summary["eval/reward_base"] and summary["eval/reward_pvalue"] < 0.01, summary


def test_relabelling_under_torchrun_is_sharded_and_equals_one_process(world, tmp_path):
    """2 processes (gloo) each score every second pair into their own shard; rank 0 joins them into the same scores
    one process computes, and both ranks train on the same relabelled pairs."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parent.parent
    flags = ["--toy", "--steps", "1", "--per-device-batch", "4", "--max-pairs", "40", "--eval-pairs", "4",
             "--num-validation-prompts", "0", "--reward-seeds", "0", "--relabel-with", "toy"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(repo / "diffusion_dpo.py"),
                    *flags, "--output-dir", str(tmp_path / "two")], check=True, cwd=repo)
    dd.main(dd.parse_args([*flags, "--per-device-batch", "8", "--output-dir", str(tmp_path / "one")]))
    cache_two, cache_one = tmp_path / "two" / "latent_cache", tmp_path / "one" / "latent_cache"
    assert sorted(p.name.split(".", 1)[1] for p in cache_two.glob("scores-*.rank*")) == [
        "rank0of2.safetensors", "rank1of2.safetensors"]
    (joined,) = [p for p in cache_two.glob("scores-*.safetensors") if ".rank" not in p.name]
    (single,) = [p for p in cache_one.glob("scores-*.safetensors") if ".rank" not in p.name]
    assert torch.equal(load_file(joined)["scores"], load_file(single)["scores"])
    rows = {run: json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("one", "two")}
    assert rows["one"] == rows["two"]  # the step-0 relabel counts


def test_cached_scores_are_keyed_by_the_data_not_its_path(world, tmp_path):
    """The data corrected in place (every human label swapped, same path) and relabelled again into the same
    --cache-dir: the scores are computed afresh, so the scorer still picks the image it rates higher (agreement with
    the humans turns into its complement). Before, the scores cached under the path were reused in the old order
    [old winner, old loser] against the new pairs, and the scorer's 'winner' was the image it rates lower."""
    write_flipped(world, tmp_path / "data", lambda i: False)  # a copy of the toy data, to correct in place
    flags = ["--toy", "--steps", "1", "--per-device-batch", "4", "--max-pairs", "16", "--eval-pairs", "4",
             "--num-validation-prompts", "0", "--reward-seeds", "0", "--relabel-with", "toy",
             "--dataset-source", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")]
    before = dd.main(dd.parse_args([*flags, "--output-dir", str(tmp_path / "a")]))
    train = tmp_path / "data" / "train" / "part-0.parquet"
    table = pq.read_table(train)
    label_0, label_1 = table.column("label_0"), table.column("label_1")
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", label_1)
    pq.write_table(table.set_column(table.schema.get_field_index("label_1"), "label_1", label_0), train)
    after = dd.main(dd.parse_args([*flags, "--output-dir", str(tmp_path / "a"), "--overwrite"]))
    assert before["relabel/kept"] == after["relabel/kept"] == 16 and before["relabel/ties"] == 0
    assert after["relabel/agreement"] == pytest.approx(1 - before["relabel/agreement"])
    assert after["relabel/flipped"] == 16 - before["relabel/flipped"]
    assert len([p for p in (tmp_path / "cache").glob("scores-*.safetensors") if ".rank" not in p.name]) == 2
