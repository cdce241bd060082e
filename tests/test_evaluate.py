"""evaluate.py: statistics against independent values and the toy evaluation (the rating kit: test_rating_kit.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

import evaluate

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ statistics


def test_fid_equals_cleanfid_and_kid_uses_its_function():
    from cleanfid import fid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(120, 16))
    b = rng.normal(size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.5
    ref = dict(mu=b.mean(0), sigma=np.cov(b, rowvar=False), feats=b)
    value, kid = evaluate.fid_kid(a, ref, seed=1)
    assert value == pytest.approx(fid.fid_from_feats(a, b), rel=1e-9)
    np.random.seed(1)
    assert kid == pytest.approx(fid.kernel_distance(a, b), rel=1e-9)
    same, _ = evaluate.fid_kid(b, ref, seed=1)  # clean-fid can give -1e-13 here; a squared distance is >= 0
    assert 0.0 <= same < 1e-6
    no_kid = evaluate.fid_kid(a, {"mu": ref["mu"], "sigma": ref["sigma"]}, seed=1)[1]
    assert no_kid is None  # saved mu/sigma alone cannot give KID


def test_bca_interval_covers_the_known_mean_at_its_nominal_rate():
    # Skewed data (exponential, mean 1) for the mean; Bernoulli-like wins for the win rate (P(d > 0) = Phi(0.3)).
    rng = np.random.default_rng(0)
    reps, n = 200, 40
    hits_mean = hits_win = 0
    p_win = scipy.stats.norm.cdf(0.3)
    for r in range(reps):
        x = rng.exponential(1.0, n)
        lo, hi = evaluate.bca_interval(x, 0.95, 1000, seed=r)
        hits_mean += lo <= 1.0 <= hi
        d = rng.normal(0.3, 1.0, n)
        lo, hi = evaluate.bca_interval((d > 0) + 0.5 * (d == 0), 0.95, 1000, seed=r)
        hits_win += lo <= p_win <= hi
    # 200 replications: the binomial sd of a 95 % rate is 1.5 %; BCa runs slightly short on skewed n = 40.
    assert 0.89 <= hits_mean / reps <= 0.99, hits_mean / reps
    assert 0.89 <= hits_win / reps <= 0.99, hits_win / reps


def test_sign_and_wilcoxon_equal_scipy_and_hand_values():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.2, 1, (30, 3)), rng.normal(0, 1, (30, 3))
    b[:4] = a[:4]  # four tied prompts: dropped by both tests
    s = evaluate.paired_comparison(a, b, n_resamples=500)
    d = a.mean(1) - b.mean(1)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    assert (s["wins"], s["ties"], s["losses"]) == (wins, 4, losses)
    assert s["p_sign"] == pytest.approx(scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-12)
    assert s["p_wilcoxon"] == pytest.approx(scipy.stats.wilcoxon(d[d != 0]).pvalue, rel=1e-12)
    assert s["win_rate"] == pytest.approx((wins + 2) / 30)
    assert s["diff"] == pytest.approx(d.mean()) and s["mean_a"] == pytest.approx(a.mean())
    # By hand: 9 wins, 1 loss -> 2 * (1 + 10) / 2^10; five positive differences -> exact 2 / 2^5.
    assert evaluate.sign_test(np.array([1.0] * 9 + [-1.0]))[3] == pytest.approx(22 / 1024)
    assert evaluate.wilcoxon_test(np.array([1.0, 2, 3, 4, 5])) == pytest.approx(2 / 32)
    assert evaluate.wilcoxon_test(np.zeros(5)) == 1.0 and evaluate.sign_test(np.zeros(5))[3] == 1.0


def test_holm_against_hand_computed_values():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    assert evaluate.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert evaluate.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert evaluate.holm([0.02]) == pytest.approx([0.02])


def _hand_holm(p: list[float]) -> list[float]:
    """Holm by its definition, written independently of evaluate.holm: rank r_j (1-based, ties by position), then
    p~_i = max over the hypotheses j ranked at or before i of min(1, (M - r_j + 1) p_j)."""
    m = len(p)
    rank = {j: r + 1 for r, j in enumerate(sorted(range(m), key=lambda j: (p[j], j)))}
    return [max(min(1.0, (m - rank[j] + 1) * p[j]) for j in range(m) if rank[j] <= rank[i]) for i in range(m)]


def test_holm_runs_across_every_comparison_and_metric():
    # Base and three candidates, two metrics, 30 prompts. True effects: "good" beats base on both metrics and "half"
    # on metric m0 only (4 true effects among the 12 comparison x metric cells, counting their mirror pairs).
    rng = np.random.default_rng(0)
    n, k = 30, 2
    noise = lambda: rng.normal(0, 1, (1, n, k))  # noqa: E731
    shift = {"base": (0, 0), "good": (1.5, 1.5), "half": (1.5, 0), "null": (0, 0)}
    scores = {a: {m: noise() + shift[a][i] for i, m in enumerate(("m0", "m1"))} for a in shift}
    pairs = [("good", "base"), ("half", "base"), ("null", "base"), ("good", "half"), ("good", "null"), ("half", "null")]
    comparisons = [dict(a=a, b=b, metrics={m: evaluate.compare(scores[a][m], scores[b][m], 0.95, 200, 0)
                                            for m in ("m0", "m1")}) for a, b in pairs]
    evaluate.holm_across(comparisons)
    cells = [s for c in comparisons for s in c["metrics"].values()]
    for test in ("p_sign", "p_wilcoxon"):
        raw = [s[test] for s in cells]
        assert [s[test + "_holm"] for s in cells] == pytest.approx(_hand_holm(raw))  # one family of all 12 cells
        within = [evaluate.holm([c["metrics"][m][test] for m in ("m0", "m1")]) for c in comparisons]
        assert [s[test + "_holm"] for s in cells] != pytest.approx([p for w in within for p in w])
    truth = {("good", "base", "m0"), ("good", "base", "m1"), ("half", "base", "m0"), ("good", "half", "m1"),
             ("half", "null", "m0"), ("good", "null", "m0"), ("good", "null", "m1")}
    found = {(c["a"], c["b"], m) for c in comparisons for m, s in c["metrics"].items() if s["p_wilcoxon_holm"] < 0.05}
    assert found == truth


def test_seeds_as_units_widen_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(1)
    n, k = 24, 2
    base = rng.normal(0, 1, (1, n, k))
    common = base + 0.5 + rng.normal(0, 0.3, (1, n, k))  # a real effect of 0.5, the same in every seed
    agree = np.concatenate([common + rng.normal(0, 0.05, (1, n, k)) for _ in range(3)])  # (3, n, k)
    disagree = np.concatenate([common + offset for offset in (-1.0, 0.0, 1.0)])  # the same mean effect
    a = evaluate.compare(agree, base, 0.95, 2000, 0)
    d = evaluate.compare(disagree, base, 0.95, 2000, 0)
    assert a["diff"] == pytest.approx(d["diff"], abs=0.05) and a["seeds_a"] == 3 and d["seeds_b"] == 1
    width = lambda s, key: s[key][1] - s[key][0]  # noqa: E731
    assert width(d, "ci_diff") > 3 * width(a, "ci_diff") and width(d, "ci_a") > 3 * width(a, "ci_a")
    assert a["ci_diff"][0] > 0  # seeds that agree: the effect is resolved
    assert d["ci_diff"][0] < 0 < d["ci_diff"][1]  # seeds that disagree: the interval covers 0
    # the win rate is the mean over seeds of each seed's win rate over prompts
    per_seed = [((disagree[s].mean(1) > base[0].mean(1)).mean()) for s in range(3)]
    assert d["win_rate"] == pytest.approx(np.mean(per_seed))
    one = evaluate.compare(agree[:1], base, 0.95, 2000, 0)  # one run each: the prompt-level BCa path
    assert one["interval"].startswith("BCa") and one == {**evaluate.paired_comparison(agree[0], base[0], 0.95, 2000, 0),
                                                        "seeds_a": 1, "seeds_b": 1, "interval": one["interval"]}


def test_set_metric_intervals_cover_and_separate():
    rng = np.random.default_rng(2)
    ref_feats = rng.normal(size=(400, 8))
    ref = dict(mu=ref_feats.mean(0), sigma=np.cov(ref_feats, rowvar=False), feats=ref_feats)
    probs = rng.dirichlet(np.ones(5) * 0.3, size=200)  # (200, 5)
    same = evaluate.set_metrics(rng.normal(size=(200, 8)), probs, ref, 0.9, 60, 0)
    shifted = evaluate.set_metrics(rng.normal(size=(200, 8)) + 0.7, probs, ref, 0.9, 60, 0)
    for s in (same, shifted):
        assert s["ci_fid"][0] <= s["fid"] <= s["ci_fid"][1] and s["ci_is"][0] <= s["is"] <= s["ci_is"][1]
        assert len(s["boot_fid"]) == 60 and s["ci_kid"] is not None
    assert shifted["ci_fid"][0] > same["ci_fid"][1] and shifted["ci_kid"][0] > same["ci_kid"][1]
    assert same["is"] == pytest.approx(evaluate.inception_score(probs, splits=1)[0])


def test_inception_score_hand_values():
    one_hot = np.eye(8)  # eight confident, distinct predictions: IS = 8; identical predictions: IS = 1
    assert evaluate.inception_score(one_hot, splits=1)[0] == pytest.approx(8.0, rel=1e-6)
    assert evaluate.inception_score(np.tile([[0.2, 0.8]], (10, 1)), splits=2) == pytest.approx((1.0, 0.0))


def test_inception_score_splits_as_improved_gan():
    """Part i = rows [i·N//10, (i+1)·N//10), written out as openai/improved-gan's inception_score/model.py loop;
    at N = 1003 np.array_split's parts differ from those and so does the std."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1003, 7)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = probs[(i * probs.shape[0] // 10):((i + 1) * probs.shape[0] // 10), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    mean, std = evaluate.inception_score(probs, splits=10)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-6)


class _FakeInception(torch.nn.Module):
    """The interface of clean-fid's TorchScript Inception (inception-2015-12-05.pt), with random weights: `layers`
    maps normalised 299 px images to pool features; forward(img in [0, 255]) gives the 1008-way softmax."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 23, stride=23), torch.nn.AdaptiveAvgPool2d(1))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        features = self.layers((img - 128) / 128).view(img.shape[0], 2048)
        if return_features:
            return features
        logits = self.output(features)
        if no_output_bias:
            logits = logits - self.output.bias
        return torch.softmax(logits, dim=1)


def test_inception_features_equal_cleanfids_own_pipeline(tmp_path):
    """Our embedding path (clean resize + Inception pool features) equals clean-fid's folder pipeline, on a stand-in
    network with the real file's interface (the real weights cannot be downloaded here)."""
    from cleanfid import fid
    from cleanfid.inception_torchscript import InceptionV3W

    torch.manual_seed(0)
    torch.jit.script(_FakeInception().eval()).save(str(tmp_path / "inception-2015-12-05.pt"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "images").mkdir()
    for n, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "images" / f"{n}.png")
    args = evaluate.Args(inception_path=str(tmp_path / "inception-2015-12-05.pt"))
    embed, _ = evaluate.load_embedder(args, torch.device("cpu"))
    feats, probs = embed(images)
    net = InceptionV3W(str(tmp_path), download=False).eval()
    theirs = fid.get_folder_features(str(tmp_path / "images"), model=net, num_workers=0, device=torch.device("cpu"),
                                     mode="clean", verbose=False)
    assert feats.shape == (3, 2048) and np.allclose(feats, theirs, rtol=1e-4, atol=1e-5)
    assert probs.shape == (3, 1008) and np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_resolve_model_kinds(tmp_path):
    run = tmp_path / "run"
    (run / "final" / "lora").mkdir(parents=True)
    assert evaluate.resolve_model("x", str(run), "base").lora == str(run / "final" / "lora")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert evaluate.resolve_model("x", str(unet), "base").unet == str(unet)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    assert evaluate.resolve_model("x", str(pipe), "base") == evaluate.Model("x", str(pipe))
    assert evaluate.resolve_model("x", "org/model", "base").pipeline == "org/model"
    with pytest.raises(ValueError, match="--candidates x="):
        evaluate.resolve_model("x", str(tmp_path), "base")


# ------------------------------------------------------------------------------------------------ end to end


def test_toy_dpo_model_beats_the_base(toy_dpo_run, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--toy", "--candidates", f"dpo={toy_dpo_run}",
           "--output-dir", str(out), "--n-resamples", "2000", "--rating-pairs", "5"]
    subprocess.run(cmd, check=True, cwd=REPO)
    results = json.loads((out / "results.json").read_text())
    (c,) = results["comparisons"]
    toy = c["metrics"]["toy"]
    assert (c["a"], c["b"]) == ("dpo", "base")
    assert toy["ci_win"][0] > 0.5 and toy["ci_diff"][0] > 0, toy  # DPO wins, and the interval excludes 50 %
    assert toy["p_wilcoxon_holm"] < 0.05
    assert set(results["models"]) == {"base", "dpo"} and results["models"]["dpo"]["n_images"] == 12 * 8
    assert "fid" in results["models"]["dpo"] and "toy stand-in" in results["feature_extractor"]
    dpo = results["models"]["dpo"]
    assert dpo["ci_fid"][0] <= dpo["fid"] <= dpo["ci_fid"][1] and dpo["ci_is"][0] <= dpo["is"] <= dpo["ci_is"][1]
    assert any("fewer than 2,048" in w for w in results["warnings"])  # 96 images: FID flagged
    prompts = (out / "args.json").read_text()
    assert "toy_prompts_heldout.txt" in prompts  # the held-out split is --toy's default
    for f in ("report.md", "grid.png", "args.json", "reference_stats.npz", "rating_kit/page_01.html",
              "rating_key.json"):
        assert (out / f).is_file(), f
    assert [f.name for f in (out / "rating_kit").iterdir()] == ["page_01.html"]  # the key is not in the raters' folder
    report = (out / "report.md").read_text()
    assert "| toy |" in report and "## Summary" in report and "fewer than 2,048" in report
    # Resume: a second run finds every image on disk, draws none, and reports the same numbers.
    stamp = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    subprocess.run(cmd, check=True, cwd=REPO)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamp
    assert json.loads((out / "results.json").read_text())["comparisons"] == results["comparisons"]


def test_one_run_reports_the_papers_columns(world, tmp_path):
    """--scorers with ImageReward and HPS (tiny random weights in their original layouts) next to CLIP: one run,
    one column each in results.json and report.md, for every model."""
    from test_scorers import BLIP_TINY, imagereward_layout, openclip_layout, tiny_bert_tokenizer
    from transformers import CLIPTokenizer

    (tmp_path / "tok").mkdir()
    vocab = tiny_bert_tokenizer(tmp_path / "tok")
    torch.save(imagereward_layout(vocab, **BLIP_TINY), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=vocab,
        max_position_embeddings=40)))
    (tmp_path / "hps").mkdir()
    clip_vocab = len(CLIPTokenizer.from_pretrained(world.clip))
    torch.save({"state_dict": openclip_layout(vocab=clip_vocab)}, tmp_path / "hps" / "HPS_v2.1_compressed.pt")
    (tmp_path / "hps" / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"vision_cfg": {"head_width": 16}, "text_cfg": {"heads": 4}}}))
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--toy", "--candidates", f"again={world.pipeline}",
           "--output-dir", str(out), "--max-prompts", "4", "--images-per-prompt", "1", "--sample-steps", "2",
           "--fid-reference", "None", "--rating-pairs", "0", "--n-resamples", "200",
           "--scorers", "toy", "clip", "imagereward", "hps",
           "--scorer-paths", f"clip={world.clip}", f"imagereward={tmp_path / 'ImageReward.pt'}",
           f"hps={tmp_path / 'hps'}",
           "--clip-paths", f"imagereward={tmp_path / 'tok'}", f"hps={world.clip}"]
    subprocess.run(cmd, check=True, cwd=REPO)
    results = json.loads((out / "results.json").read_text())
    (c,) = results["comparisons"]
    assert set(c["metrics"]) >= {"toy", "clip", "imagereward", "hps"}
    # the same weights drawn with the same seeds: every paired difference is 0 on every scorer
    for name in ("imagereward", "hps"):
        assert c["metrics"][name]["ci_diff"][0] == pytest.approx(0, abs=1e-6), name
    report = (out / "report.md").read_text()
    assert "| imagereward |" in report and "| hps |" in report


def test_scorer_paths_merge_with_the_toy_defaults_and_offline_errors_name_the_flag(world, tmp_path):
    """`--toy --scorer-paths reward-model=...` keeps the toy's CLIP for the clip score (a given --scorer-paths used to
    replace the toy's `clip=` default, and the CLIP scorer then reached for the hub); a scorer whose weights would
    come from the hub fails offline with an error naming the flag to pass."""
    from common.scorers import RewardMLP, save_reward_model

    torch.manual_seed(0)
    save_reward_model(tmp_path / "rm", RewardMLP(32), dict(clip=str(world.clip), embed_dim=32, hidden_dim=512,
                                                           num_hidden_layers=3))
    quick = ["--toy", "--candidates", f"same={world.pipeline}", "--max-prompts", "2", "--sample-steps", "2",
             "--rating-pairs", "0", "--fid-reference", "None", "--n-resamples", "200"]
    out = tmp_path / "ev"
    evaluate.main(evaluate.check_args(evaluate.parse_args([
        *quick, "--scorers", "clip", "reward-model", "--scorer-paths", f"reward-model={tmp_path / 'rm'}",
        "--output-dir", str(out)])))
    results = json.loads((out / "results.json").read_text())
    clip = np.array(results["runs"]["base"]["per_image"]["clip"])
    assert clip.shape == (2, 8) and np.isfinite(clip).all() and clip.max() > 0  # the tiny CLIP's score, offline
    assert np.isfinite(results["runs"]["same"]["per_image"]["reward-model"]).all()
    with pytest.raises(OSError, match=r"--scorer-paths pickscore=PATH"):
        evaluate.main(evaluate.check_args(evaluate.parse_args([*quick, "--scorers", "pickscore",
                                                               "--output-dir", str(tmp_path / "offline")])))


def test_images_are_keyed_by_prompt_and_weights_not_by_the_output_dir(world, tmp_path):
    """Re-run into the same --output-dir with other --prompts: the rows whose prompt changed are drawn again (and
    only those), so every score is of an image of its own prompt, as in a fresh folder. Then a candidate retrained
    into the same folder: its images are refused, naming the flag. Before, the old images were scored against the
    new prompts ("drawn again: 0"), and a retrained candidate reused its predecessor's images."""
    import shutil

    from safetensors.torch import load_file, save_file

    lines = world.prompts.read_text().splitlines()
    (tmp_path / "a.txt").write_text("\n".join(lines[:3]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join([lines[0], lines[10], lines[2]]) + "\n")  # row 1 changed
    shutil.copytree(world.pipeline / "unet", tmp_path / "unet")  # a candidate in a folder of its own

    def run(out: str, prompts: str) -> dict:
        return evaluate.main(evaluate.check_args(evaluate.parse_args([
            "--toy", "--candidates", f"cand={tmp_path / 'unet'}", "--scorers", "toy", "--sample-steps", "2",
            "--images-per-prompt", "2",
            "--rating-pairs", "0", "--fid-reference", "None", "--n-resamples", "200", "--prompts",
            str(tmp_path / prompts), "--output-dir", str(tmp_path / out)])))

    run("same", "a.txt")
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "same" / "images").rglob("*.png")}
    again, fresh = run("same", "b.txt"), run("fresh", "b.txt")
    for name in ("base", "cand"):
        assert again["runs"][name]["per_image"] == fresh["runs"][name]["per_image"]
        drawn = {p.name for p in (tmp_path / "same" / "images" / name).glob("*.png")
                 if p.stat().st_mtime_ns != kept[p]}
        assert drawn == {"00001_00.png", "00001_01.png"}, drawn  # row 1's two images
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 1e-3 for k, v in load_file(weights).items()}, weights)  # retrained: the same path and size
    with pytest.raises(ValueError, match=r"images/cand: drawn with other settings than now \(weights differ.*"
                                         r"--output-dir"):
        run("same", "b.txt")
