"""rating_kit.py: Fleiss' kappa against a worked example, ingest against hand computations (through rating_kit.py and
evaluate.py alike), and the kit's pages in a real headless Chromium."""

import ast
import base64
import dataclasses
import functools
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import scipy.stats
import torch
import tyro
from PIL import Image, ImageDraw

import evaluate
import rating_kit
from common import stats
from common.toy import PROMPTS, toy_reward
from test_evaluate import _hand_holm

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INGEST = {"evaluate.py": lambda argv: evaluate.main(evaluate.parse_args(argv)),  # the two ways to ingest, in-process
          "rating_kit.py": lambda argv: rating_kit.main(tyro.cli(rating_kit.Args, args=argv))}


# ------------------------------------------------------------------------------------------------ statistics


def test_fleiss_kappa_wikipedia_example():
    # https://en.wikipedia.org/wiki/Fleiss%27_kappa worked example: 10 items, 14 raters, 5 categories -> 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert rating_kit.fleiss_kappa(np.array(counts)) == pytest.approx(0.20993, abs=1e-4)
    assert rating_kit.fleiss_kappa(np.array([[2, 0, 0], [0, 2, 0], [0, 0, 2]])) == pytest.approx(1.0)
    assert math.isnan(rating_kit.fleiss_kappa(np.array([[1, 0, 0]])))  # one rater: no agreement to measure


def _imported_modules(path: Path) -> set[str]:
    """The top-level names of every module a file imports, anywhere in it (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_statistics_module_keeps_the_imports_one_way():
    """evaluate.py -> rating_kit.py -> common/stats.py: the kit never imports evaluate.py, the statistics neither."""
    assert "evaluate" not in _imported_modules(REPO / "rating_kit.py")
    assert not {"evaluate", "rating_kit"} & _imported_modules(REPO / "common" / "stats.py")
    assert "rating_kit" in _imported_modules(REPO / "evaluate.py")
    # nor through another module: importing the kit (or the statistics) loads no evaluate
    for module in ("rating_kit", "common.stats"):
        res = subprocess.run([sys.executable, "-c", f"import sys, {module}; print(sorted(m for m in sys.modules if m "
                              "in ('evaluate', 'rating_kit')))"], cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split() == (["['rating_kit']"] if module == "rating_kit" else ["[]"]), module
    # one set of functions: the names evaluate.py's users import from it, and the kit's, are common/stats.py's
    for name in ("bca_interval", "sign_test", "wilcoxon_test", "paired_comparison", "holm", "holm_across",
                 "seeds_comparison", "compare", "fmt"):
        assert getattr(evaluate, name) is getattr(stats, name), name
    for name in ("bca_interval", "sign_test", "wilcoxon_test", "holm", "fmt"):
        assert getattr(rating_kit, name) is getattr(stats, name), name


@functools.cache
def _power_by_binomtest(n: int, p1: float, alpha: float) -> float:
    """The sign test's power by enumeration: P(K = k) summed over the k where scipy's binomtest rejects."""
    k = np.arange(n + 1)
    rejected = np.array([scipy.stats.binomtest(int(x), n, 0.5).pvalue <= alpha for x in k])
    return float(scipy.stats.binom.pmf(k, n, p1)[rejected].sum())


def test_sign_test_power_and_pairs_needed_against_binomtest():
    for n in (1, 5, 6, 17, 50, 120, 199, 200):
        for p1, alpha in ((0.6, 0.05), (0.35, 0.01), (0.75, 0.005)):
            assert stats.sign_test_power(n, p1, alpha) == pytest.approx(_power_by_binomtest(n, p1, alpha), abs=1e-12)
    # and by simulation: the share of Binomial(n, p1) draws sign_test itself rejects
    wins = np.random.default_rng(0).binomial(60, 0.65, size=20_000)  # (draws,) A's wins among 60 untied pairs
    p = {w: stats.sign_test(np.array([1.0] * w + [-1.0] * (60 - w)))[3] for w in set(wins.tolist())}
    simulated = np.mean([p[w] <= 0.05 for w in wins])  # standard error 0.0035
    assert simulated == pytest.approx(stats.sign_test_power(60, 0.65, 0.05), abs=0.012)
    # pairs_needed: from that n on the power stays at the target (the next few checked here), the n before falls short
    for p1, alpha in ((0.6, 0.05), (0.7, 0.05 / 30), (0.4, 0.01)):
        n = stats.pairs_needed(p1, alpha, 0.8, n_max=1000)
        assert all(_power_by_binomtest(m, p1, alpha) >= 0.8 for m in range(n, n + 4))
        assert _power_by_binomtest(n - 1, p1, alpha) < 0.8
    # the saw-tooth it guards against (docs/rating_kit.md): 199 pairs reach 80 % at 60 %, 200 do not
    assert _power_by_binomtest(199, 0.6, 0.05) >= 0.8 > _power_by_binomtest(200, 0.6, 0.05)
    assert stats.pairs_needed(0.6, 0.05, 0.8) > 200
    with pytest.raises(ValueError, match="n_max"):
        stats.pairs_needed(0.51, 0.05, 0.8, n_max=100)


# ------------------------------------------------------------------------------------------------ export and ingest


def _draw(prompt: str, radius: int) -> Image.Image:
    """A clean circle of the prompt's colour (no jitter), so its toy reward is ordered by the radius."""
    from common.toy import COLORS, parse_prompt

    img = Image.new("RGB", (32, 32), (235, 235, 235))
    ImageDraw.Draw(img).ellipse([16 - radius, 16 - radius, 16 + radius, 16 + radius], fill=COLORS[parse_prompt(prompt)[0]])
    return img


def _fake_run(out: Path, models: list[str], n: int, k: int, seed: int = 0) -> dict:
    """images/<model>/<i>_<j>.png with random radii from a coarse set; returns {(model, i, j): radius}."""
    rng = np.random.default_rng(seed)
    radius = {}
    for m in models:
        for i in range(n):
            for j in range(k):
                radius[m, i, j] = int(rng.choice([3, 6, 9, 12]))
                path = evaluate.image_path(out, m, i, j)
                path.parent.mkdir(parents=True, exist_ok=True)
                _draw(PROMPTS[i], radius[m, i, j]).save(path)
    return radius


def _images(out: Path):
    """Where evaluate.py draws image j of prompt i of a run, as export_rating_kit reads it."""
    return lambda run, i, j: evaluate.image_path(out, run, i, j)


def _hand_kappa(labels: list[list[str]]) -> float:
    """Fleiss' kappa from each item's list of labels, by the textbook formulas (independent of evaluate's)."""
    cats = sorted({c for item in labels for c in item})
    n = len(labels[0])
    p_i = [(sum(item.count(c) ** 2 for c in cats) - n) / (n * (n - 1)) for item in labels]
    p_c = [sum(item.count(c) for item in labels) / (n * len(labels)) for c in cats]
    p_e = sum(p * p for p in p_c)
    return (sum(p_i) / len(p_i) - p_e) / (1 - p_e)


def _kit(tmp_path, n=10, checks=2):
    _fake_run(tmp_path, ["modelAlpha", "modelBeta"], n=n, k=1)
    arms = {"modelBeta": ["modelBeta"], "modelAlpha": ["modelAlpha"]}
    kit, key_file = rating_kit.export_rating_kit(tmp_path, _images(tmp_path), PROMPTS[:n],
                                                 [("modelBeta", "modelAlpha")], arms, 1, n, seed=3,
                                                 attention_checks=checks)
    return kit, key_file, json.loads(key_file.read_text())


def test_the_key_lies_outside_the_kit_folder_and_the_pages_say_nothing_of_the_models(tmp_path):
    """The folder that goes to the raters holds this kit's pages and nothing else; the key is beside it."""
    runs = {"modelAlpha": ["modelAlpha"], "modelBeta": ["modelBeta_run0", "modelBeta_run1"]}  # a two-seed arm too
    _fake_run(tmp_path, [r for rs in runs.values() for r in rs], n=6, k=2)
    kit = tmp_path / "rating_kit"
    kit.mkdir()
    (kit / "key.json").write_text("{}")  # where an earlier version wrote its key, and an earlier kit's extra page
    (kit / "page_07.html").write_text("<html></html>")
    kit_out, key_file = rating_kit.export_rating_kit(tmp_path, _images(tmp_path), PROMPTS[:6],
                                                     [("modelBeta", "modelAlpha"), ("modelAlpha", "modelBeta")], runs,
                                                     2, 5, seed=2, attention_checks=1)
    assert kit_out == kit and key_file == tmp_path / "rating_key.json" and kit not in key_file.parents
    assert sorted(str(f.relative_to(kit)) for f in kit.rglob("*")) == ["page_01.html", "page_02.html"]
    key = json.loads(key_file.read_text())
    assert key["kit_id"] == rating_kit.kit_hash(key) and len(key["pairs"]) == 2 * (5 + 1)
    names = list(runs) + [r for rs in runs.values() for r in rs]
    for page in kit.glob("*.html"):
        html = page.read_text()
        assert not any(name in html for name in names)
        data = json.loads(re.search(r'<script id="kit" type="application/json">(.*?)</script>', html, re.S).group(1))
        assert set(data) == {"kit_id", "page", "pixelated", "questions", "pairs"} and data["kit_id"] == key["kit_id"]
        for pair in data["pairs"]:  # an id that says nothing, the prompt, two inlined images: no side, no model
            assert set(pair) == {"id", "prompt", "left", "right"} and re.fullmatch(rf"{page.stem}-q\d{{3}}", pair["id"])
            assert all(pair[side].startswith("data:image/jpeg;base64,") for side in ("left", "right"))


def test_ingest_ratings_per_criterion_attention_checks_and_kappa(tmp_path):
    kit, key_file, key = _kit(tmp_path)
    assert [p.name for p in sorted(kit.glob("*.html"))] == ["page_01.html"] and key["criteria"] == \
        ["appeal", "alignment", "overall"]
    side = lambda p, model: "left" if p["left"] == model else "right"  # noqa: E731
    real = [p for p in key["pairs"] if not p["check"]]
    assert len(real) == 10 and sum(p["check"] for p in key["pairs"]) == 2
    # Scripted rules by pair number q: appeal r1 Beta, r2 Beta if q even else tie; alignment both Beta, tie, Alpha
    # cyclically; overall r1 Beta, r2 Alpha. Attention checks: r1 answers tie, r2 "left" (fails all 3 x 2 answers).
    def rule(rater, p):
        q = int(p["id"][-3:])
        if p["check"]:
            return {c: "tie" if rater == "r1" else "left" for c in key["criteria"]}
        return {"appeal": side(p, "modelBeta") if rater == "r1" or q % 2 == 0 else "tie",
                "alignment": [side(p, "modelBeta"), "tie", side(p, "modelAlpha")][q % 3],
                "overall": side(p, "modelBeta" if rater == "r1" else "modelAlpha")}
    files = []
    for rater in ("r1", "r2"):
        files.append(tmp_path / f"{rater}.json")
        files[-1].write_text(json.dumps(dict(kit_id=key["kit_id"], page="page_01", rater=rater,
                                             choices={p["id"]: rule(rater, p) for p in key["pairs"]})))
    both = rating_kit.ingest_ratings([str(f) for f in files], str(key_file), 0.95, 1000, 0,
                                     max_attention_failures=None)
    assert both["attention"]["failures"] == {"r1": 0, "r2": 6} and both["excluded"] == []
    cell = {c["criterion"]: c for c in both["comparisons"]}
    q = np.array([int(p["id"][-3:]) for p in real])
    label = lambda p, rater, crit: {"left": p["left"], "right": p["right"], "tie": "tie"}[rule(rater, p)[crit]]  # noqa
    for crit in key["criteria"]:  # the win rate the rules imply, and kappa by hand over the 10 pairs
        x = [np.mean([{"modelBeta": 1, "tie": 0.5, "modelAlpha": 0}[label(p, r, crit)] for r in ("r1", "r2")])
             for p in real]
        assert cell[crit]["win_rate"] == pytest.approx(np.mean(x)) and cell[crit]["n_judgements"] == 20
        hand = _hand_kappa([[label(p, r, crit) for r in ("r1", "r2")] for p in real])
        assert both["fleiss_kappa"][crit] == pytest.approx(hand) and cell[crit]["fleiss_kappa"] == pytest.approx(hand)
    assert cell["alignment"]["fleiss_kappa"] == pytest.approx(1.0) and cell["overall"]["fleiss_kappa"] < 0
    assert cell["appeal"]["win_rate"] == pytest.approx((10 + (q % 2 == 0).sum() + 0.5 * (q % 2 == 1).sum()) / 20)
    # Holm across the 3 criteria x 1 comparison
    assert [c["p_sign_holm"] for c in both["comparisons"]] == pytest.approx(
        _hand_holm([c["p_sign"] for c in both["comparisons"]]))
    # The default excludes a rater who fails any check: r2 goes, and only r1's answers count.
    strict = evaluate.main(evaluate.parse_args(["--ingest-ratings", *map(str, files), "--rating-key",
                                                str(key_file), "--n-resamples", "1000"]))
    assert strict["excluded"] == ["r2"] and strict["raters"] == ["r1"]
    assert {c["criterion"]: c["win_rate"] for c in strict["comparisons"]}["overall"] == pytest.approx(1.0)
    assert json.loads((key_file.parent / "ratings.json").read_text()) == json.loads(json.dumps(strict))
    assert "r2 6/6 wrong" in (key_file.parent / "ratings.md").read_text()


def test_a_rater_who_skips_attention_checks_is_excluded_like_one_who_fails_them(tmp_path):
    """Every check question of every page a rater answered must be answered tie: one skipped fails like a wrong one.
    A rater who rated only page_01 is not asked page_02's checks."""
    models = ["modelAlpha", "modelBeta", "modelGamma"]
    _fake_run(tmp_path, models, n=6, k=1)
    kit, key_file = rating_kit.export_rating_kit(tmp_path, _images(tmp_path), PROMPTS[:6], [
        ("modelBeta", "modelAlpha"), ("modelGamma", "modelAlpha")], {m: [m] for m in models}, 1, 6, seed=1)
    key = json.loads(key_file.read_text())
    page1 = [p for p in key["pairs"] if p["page"] == "page_01"]
    crit = key["criteria"]

    def rater_file(name: str, choices: dict) -> str:
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(kit_id=key["kit_id"], rater=name, choices=choices)))
        return str(tmp_path / f"{name}.json")

    files = [rater_file("careful", {p["id"]: {c: "tie" if p["check"] else "left" for c in crit} for p in page1}),
             rater_file("dodger", {p["id"]: {c: "left" for c in crit} for p in page1 if not p["check"]}),  # no check
             rater_file("half", {p["id"]: ({"overall": "tie"} if p["check"] else {c: "right" for c in crit})
                                 for p in page1})]  # the checks' overall question only
    r = rating_kit.ingest_ratings(files, str(key_file), 0.95, 1000, 0)
    asked = 2 * len(crit)  # page_01's two checks x 3 questions
    assert r["attention"]["checks"] == {"careful": asked, "dodger": asked, "half": asked}
    assert r["attention"]["unanswered"] == {"careful": 0, "dodger": asked, "half": asked - 2}
    assert r["attention"]["failures"] == r["attention"]["unanswered"]
    assert r["excluded"] == ["dodger", "half"] and r["raters"] == ["careful"]
    assert all(c["n_judgements"] == 6 for c in r["comparisons"] if c["b"] == "modelAlpha" and c["a"] == "modelBeta")
    md = rating_kit.ratings_markdown(r)
    assert "careful 0/6 wrong, dodger 6/6 wrong (6 unanswered), half 4/6 wrong (4 unanswered)" in md
    # a tolerance counts the skipped questions as failures too; None keeps everyone and counts their answers
    assert rating_kit.ingest_ratings(files, str(key_file), 0.95, 1000, 0, 4)["excluded"] == ["dodger"]
    kept = rating_kit.ingest_ratings(files, str(key_file), 0.95, 1000, 0, None)
    assert kept["excluded"] == [] and {c["n_judgements"] for c in kept["comparisons"]} == {18}


def test_ingest_rejects_a_tampered_key_and_broken_rater_files_naming_them(tmp_path):
    kit, key_file, key = _kit(tmp_path, n=4, checks=0)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(dict(kit_id=key["kit_id"], rater="g", choices={
        p["id"]: {"overall": "left"} for p in key["pairs"]})))
    args = ["--rating-key", str(key_file), "--n-resamples", "1000"]
    evaluate.main(evaluate.parse_args(["--ingest-ratings", str(good), *args]))
    table = (key_file.parent / "ratings.json").read_text()
    broken = {"empty.json": "", "truncated.json": json.dumps(dict(kit_id=key["kit_id"], choices={}))[:-5],
              "list.json": "[1, 2]", "nochoices.json": json.dumps(dict(kit_id=key["kit_id"], rater="x")),
              "notadict.json": json.dumps(dict(kit_id=key["kit_id"], rater="x", choices=["left"])),
              "nothing.json": json.dumps(dict(kit_id=key["kit_id"], rater="x", choices={})),
              "badanswer.json": json.dumps(dict(kit_id=key["kit_id"], rater="x",
                                                choices={key["pairs"][0]["id"]: "left"}))}
    for name, text in broken.items():
        (tmp_path / name).write_text(text)
        for ingest in INGEST.values():  # python evaluate.py --ingest-ratings and python rating_kit.py alike
            with pytest.raises(ValueError, match=f"{tmp_path / name}: "):
                ingest(["--ingest-ratings", str(tmp_path / name), *args])
            assert (key_file.parent / "ratings.json").read_text() == table  # the earlier table stands
    # Swap one pair's sides in the key, kit id kept: the key no longer hashes to its id.
    key["pairs"][0]["left"], key["pairs"][0]["right"] = key["pairs"][0]["right"], key["pairs"][0]["left"]
    key_file.write_text(json.dumps(key))
    with pytest.raises(ValueError, match="does not hash to its kit_id"):
        rating_kit.ingest_ratings([str(good)], str(key_file), 0.95, 1000, 0)


def test_rating_kit_py_has_evaluates_ingest_flags_and_gives_the_same_ratings(tmp_path, capsys):
    """`python rating_kit.py` is evaluate.py's --ingest-ratings on its own: the same flags with the same defaults, and
    the same ratings.json, ratings.md and printout, with default flags and with every flag changed."""
    res = subprocess.run([sys.executable, str(REPO / "rating_kit.py"), "--help"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-2000:]
    flags = set(re.findall(r"(?m)^\S (--[a-z0-9][a-z0-9-]*)", res.stdout))
    assert flags == {"--ingest-ratings", "--rating-key", "--max-attention-failures", "--confidence", "--n-resamples",
                     "--seed"}
    for field in dataclasses.fields(rating_kit.Args):  # one vocabulary: evaluate.py's flag of that name, its default
        assert field.default == getattr(evaluate.Args(), field.name), field.name
    assert list(rating_kit.QUESTIONS) == list(get_args(evaluate.Criterion))  # every criterion evaluate accepts is asked

    kit, key_file, key = _kit(tmp_path, n=6, checks=1)

    def answer(rater: str, p: dict, n: int) -> str:  # r1: tie on the check, else by pair and criterion; r2: left
        if rater == "r2":
            return "left"  # fails the check
        return "tie" if p["check"] else ["left", "tie", "right"][(int(p["id"][-3:]) + n) % 3]

    files = []
    for rater in ("r1", "r2"):
        choices = {p["id"]: {c: answer(rater, p, n) for n, c in enumerate(key["criteria"])} for p in key["pairs"]}
        files.append(tmp_path / f"{rater}.json")
        files[-1].write_text(json.dumps(dict(kit_id=key["kit_id"], page="page_01", rater=rater, choices=choices)))
    base = ["--ingest-ratings", *map(str, files), "--rating-key", str(key_file), "--n-resamples", "1000"]
    tables = []
    for extra in ([], ["--max-attention-failures", "None", "--confidence", "0.9", "--seed", "3"]):
        outputs = {}
        for script, ingest in INGEST.items():
            ingest(base + extra)
            outputs[script] = [(key_file.parent / f).read_text() for f in ("ratings.json", "ratings.md")]
            outputs[script].append(capsys.readouterr().out)
            for f in ("ratings.json", "ratings.md"):
                (key_file.parent / f).unlink()  # the next ingest writes its own
        assert outputs["rating_kit.py"] == outputs["evaluate.py"]
        tables.append(json.loads(outputs["evaluate.py"][0]))
    # the flags reach ingest: r2 excluded by default, kept with None; other intervals at 0.9 and seed 3
    assert tables[0]["excluded"] == ["r2"] and tables[1]["excluded"] == [] and tables[1]["raters"] == ["r1", "r2"]
    assert [c["ci_win"] for c in tables[0]["comparisons"]] != [c["ci_win"] for c in tables[1]["comparisons"]]
    # and as a command, which prints what it wrote
    res = subprocess.run([sys.executable, str(REPO / "rating_kit.py"), *base], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.endswith(f"wrote {key_file.parent / 'ratings.json'} and {key_file.parent / 'ratings.md'}\n")
    assert json.loads((key_file.parent / "ratings.json").read_text()) == tables[0]


def _browser(download_dir: Path, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


def _out_of_view(driver) -> dict:
    """The page's images and buttons that are not wholly inside the viewport, {id: [left, top, right, bottom]}, and
    "scroll": the document's height if the page scrolls at all. {} when the rater sees everything at once."""
    return driver.execute_script("""
        const out = {};
        for (const id of ["left", "right", "choose-left", "choose-tie", "choose-right", "back", "save", "rater"]) {
          const r = document.getElementById(id).getBoundingClientRect();
          if (r.width === 0 || r.top < 0 || r.left < 0 || r.bottom > innerHeight || r.right > innerWidth)
            out[id] = [r.left, r.top, r.right, r.bottom];
        }
        const height = document.documentElement.scrollHeight;
        if (height > innerHeight || scrollY !== 0) out.scroll = height;
        return out;""")


def _wait_for(path: Path, timeout: float = 20.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return path
        time.sleep(0.1)
    raise AssertionError(f"the page did not save {path}")


# Skipped on a machine without the browser, but never under CI (CI=true), where .ci/run installs both: there a
# missing driver must fail the run, not hide the test.
@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("true", "1") and
                    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="needs the system Chromium and chromedriver (apt-get install chromium chromium-driver; "
                           ".ci/run installs them)")
def test_rating_kit_round_trip_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    models = ["modelAlpha", "modelBeta", "modelGamma"]
    radius = _fake_run(tmp_path, models, n=8, k=2)
    comparisons = [("modelBeta", "modelAlpha"), ("modelGamma", "modelAlpha"), ("modelBeta", "modelGamma")]
    arms = {m: [m] for m in models}
    kit, key_file = rating_kit.export_rating_kit(tmp_path, _images(tmp_path), PROMPTS[:8], comparisons, arms, 2, 4,
                                                 seed=0, attention_checks=1, pixelated=True)
    pages = sorted(kit.glob("page_*.html"))
    assert len(pages) == 3
    for page in pages:
        html = page.read_text()
        assert not any(m in html for m in models) and "http" not in html.replace("http-equiv", "")  # blind, offline
    key = json.loads(key_file.read_text())
    per_page = len(key["pairs"]) // 3
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(downloads, Path(tempfile.mkdtemp(prefix="chromium-profile-")))
    driver.set_window_size(1280, 900)  # a laptop's window: its viewport is smaller still (the browser's own bars)
    try:
        for page in pages:
            # Rater "sizer": on every question, the bigger shape of the prompt's colour, judged from the pixels shown
            # (a tie within 0.03: so the attention checks, one image twice, are answered tie).
            driver.get(page.as_uri())
            # Without scrolling, the images and every button are in view, even under a prompt of several lines.
            driver.execute_script("document.getElementById('prompt').textContent = 'a long prompt '.repeat(40)")
            assert _out_of_view(driver) == {}
            driver.execute_script("show()")  # the page's own text again
            for _ in range(per_page * 3):
                body = driver.find_element(By.TAG_NAME, "body")
                question, index = body.get_attribute("data-question"), int(body.get_attribute("data-index"))
                if index == 0:  # each of the first pair's questions
                    assert _out_of_view(driver) == {}, question
                shown_prompt = driver.find_element(By.ID, "prompt").text.strip().strip('"')
                prompt = driver.execute_script(f"return kit.pairs[{index}].prompt")
                assert shown_prompt == ("" if question == "appeal" else prompt)  # appeal: judged without the text
                shown = []
                for side in ("left", "right"):
                    src = driver.find_element(By.ID, side).get_attribute("src")
                    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
                    shown.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))
                r_left, r_right = toy_reward(torch.stack(shown), [prompt, prompt]).tolist()
                choice = "tie" if abs(r_left - r_right) < 0.03 else "left" if r_left > r_right else "right"
                driver.find_element(By.ID, f"choose-{choice}").click()
            driver.find_element(By.ID, "rater").send_keys("sizer")
            driver.find_element(By.ID, "save").click()
            _wait_for(downloads / f"ratings-sizer-{page.stem}.json")
            # Rater "lefty", by keyboard, in a fresh session of the page: always the left image (fails the checks).
            driver.execute_script("localStorage.clear()")
            driver.refresh()
            body = driver.find_element(By.TAG_NAME, "body")
            for _ in range(per_page * 3):
                body.send_keys(Keys.ARROW_LEFT)
            assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-index") == str(per_page)
            driver.find_element(By.ID, "rater").send_keys("lefty")
            driver.find_element(By.ID, "save").click()
            _wait_for(downloads / f"ratings-lefty-{page.stem}.json")
    finally:
        driver.quit()

    files = sorted(str(f) for f in downloads.glob("ratings-*.json"))
    r = rating_kit.ingest_ratings(files, str(key_file), 0.95, 1000, 0)  # default: any failed check excludes
    assert r["excluded"] == ["lefty"] and r["raters"] == ["sizer"]
    assert r["attention"]["failures"] == {"lefty": 9, "sizer": 0}  # 3 checks x 3 questions, all answered "left"
    assert len(r["comparisons"]) == 9  # 3 criteria x 3 comparisons
    for c in r["comparisons"]:
        rows = [p for p in key["pairs"] if (p["a"], p["b"]) == (c["a"], c["b"]) and not p["check"]]
        ra = np.array([radius[c["a"], p["prompt_idx"], p["image"]] for p in rows])
        rb = np.array([radius[c["b"], p["prompt_idx"], p["image"]] for p in rows])
        assert c["n_pairs"] == 4 and c["win_rate"] == pytest.approx(np.mean((ra > rb) + 0.5 * (ra == rb)))
    both = rating_kit.ingest_ratings(files, str(key_file), 0.95, 1000, 0, max_attention_failures=None)
    for crit in key["criteria"]:  # kappa of the two scripted raters, by hand
        labels = []
        for p in (p for p in key["pairs"] if not p["check"]):
            ra, rb = radius[p["a"], p["prompt_idx"], p["image"]], radius[p["b"], p["prompt_idx"], p["image"]]
            sizer = "a" if ra > rb else "b" if rb > ra else "tie"
            labels.append([sizer, "a" if p["left"] == p["a"] else "b"])
        assert both["fleiss_kappa"][crit] == pytest.approx(_hand_kappa(labels))


