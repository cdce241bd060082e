"""The double-blind human rating kit: pages a rater opens offline, and their answers back into statistics.

Docs (usage, outputs, implementation details with sources, tests): docs/rating_kit.md

Automated scores are not the last word on a preference method, so evaluate.py writes this kit next to its scores
(export_rating_kit; --rating-pairs N, default 50): for every comparison (A, B) of its report, one self-contained page
rating_kit/page_NN.html of N side-by-side pairs (one prompt and seed, left and right at random, the images inlined so
the page needs no network, model names nowhere), and rating_key.json beside the folder, not in it: the truth, which
stays with you, so sending the whole folder to raters gives nothing away. Every pair is asked each criterion in turn
(--rating-criteria), each answered left / right / tie (Diffusion-DPO's protocol):

    appeal      Which image is more visually appealing?            the prompt hidden: judge the images alone
    alignment   Which image fits the text better?                  the prompt shown
    overall     Which image do you prefer overall, for this text?  the prompt shown

Each page also holds --attention-checks pairs (default 2) that show one image on both sides: every answer there must
be tie. A rater presses "Save ratings" and sends back ratings-<name>-page_NN.json. Ingest checks every file, then
un-blinds it with the key; per criterion, comparison (A, B) and pair i = 1..n:

    x_i = mean over raters of 1 (A chosen), 1/2 (tie), 0 (B chosen)
    W   = (1/n) sum_i x_i                 A's win rate, with a BCa bootstrap interval over the n pairs
    sign test:  #{x_i > 1/2} ~ Binomial(#{x_i != 1/2}, 1/2) under H0;   Wilcoxon signed-rank test of the x_i - 1/2
    Holm across every criterion x comparison of the ratings, per test
    Fleiss' kappa = (P_bar - P_e) / (1 - P_e) over the categories {A, tie, B}, per criterion and per cell: P_bar the
        mean agreement of an item's raters, P_e the agreement chance gives (fleiss_kappa has the formula)

A rater who failed more than --max-attention-failures check questions (default 0) is excluded from the statistics;
every check question of every page the rater answered counts, and one answered with anything but tie fails, as does
one left unanswered. Every rater's failures are reported either way. The intervals and tests are evaluate.py's
(bca_interval, sign_test, wilcoxon_test, holm), from common/stats.py, which both files import.

Usage:
    python evaluate.py --candidates dpo=runs/diffusion_dpo-XXXX     # runs/evaluate-XXXX/rating_kit/, rating_key.json
    # send the folder rating_kit/ to the raters and keep rating_key.json; with their files back:
    python rating_kit.py --ingest-ratings alice.json bob.json --rating-key runs/evaluate-XXXX/rating_key.json
    python rating_kit.py --ingest-ratings ratings-*.json --rating-key runs/evaluate-XXXX/rating_key.json \
        --max-attention-failures None                                # keep every rater
    # the same ingest through evaluate.py (its --ingest-ratings calls write_ratings below):
    python evaluate.py --ingest-ratings alice.json bob.json --rating-key runs/evaluate-XXXX/rating_key.json
Each writes ratings.json and ratings.md beside the key.
"""

import base64
import hashlib
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tyro
from PIL import Image

from common.runtime import require

# The statistics of evaluate.py's report, so human and automated win rates are computed alike. This file does not
# import evaluate.py (evaluate.py imports it), so `python rating_kit.py` runs on its own.
from common.stats import bca_interval, fmt, holm, sign_test, wilcoxon_test


@dataclass
class Args:
    ingest_ratings: tuple[str, ...] = ()
    """rater files saved by the kit's pages (any number: a rater may send one per page); un-blinded with --rating-key"""
    rating_key: str | None = None
    """the kit's rating_key.json (ratings.json and ratings.md are written beside it)"""
    max_attention_failures: int | None = 0
    """exclude a rater who failed more than this many attention-check questions of the pages they rated (answered
    other than tie, or left unanswered; reported either way); None: keep every rater"""
    confidence: float = 0.95
    """confidence level of every interval"""
    n_resamples: int = 10_000
    """bootstrap resamples per interval"""
    seed: int = 0
    """seed of the bootstrap"""


# The question of each criterion that evaluate.py's --rating-criteria can name (its Criterion), asked in the order
# given; "appeal" hides the prompt on the page.
QUESTIONS = {"appeal": "Which image is more visually appealing? (the prompt is hidden: judge the image alone)",
             "alignment": "Which image fits the text better?",
             "overall": "Which image do you prefer overall, for this text?"}


# ------------------------------------------------------------------------------------------------ the kit


def kit_hash(key: dict) -> str:
    """The kit id: a hash of everything the key says (criteria, comparisons, every pair's models, sides, images), so
    a key edited after the kit was sent (sides swapped, say) no longer matches the raters' files."""
    content = {k: key[k] for k in ("criteria", "comparisons", "pairs")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def export_rating_kit(out: Path, image_file: Callable[[str, int, int], Path], prompts: list[str],
                      comparisons: list[tuple[str, str]], arms: dict[str, list[str]], k: int, n_pairs: int, seed: int,
                      criteria: tuple[str, ...] = ("appeal", "alignment", "overall"), attention_checks: int = 2,
                      pixelated: bool = False) -> tuple[Path, Path]:
    """out/rating_kit/page_NN.html, one self-contained page per comparison (names hidden, left/right random, each pair
    asked every criterion), and out/rating_key.json, the truth (its kit_id is a hash of its content), outside the
    folder that goes to the raters; returns both paths.
    Per comparison (A, B): n_pairs distinct prompts, each with a random image j of a random run (seed) of each arm,
    plus `attention_checks` pairs that show one image on both sides (the right answer is tie on every question).
    arms: {arm: [its runs' names]}; image_file(run, i, j) is the file of image j of prompt i of a run (evaluate.py
    passes its image_path: out/images/<run>/<i>_<j>.png), and k is the images per prompt."""
    rng = random.Random(seed)
    pairs, pages = [], []
    for c, (a, b) in enumerate(comparisons):
        page, rows = f"page_{c + 1:02d}", []
        for i in rng.sample(range(len(prompts)), min(n_pairs, len(prompts))):
            j, run_a, run_b = rng.randrange(k), rng.choice(arms[a]), rng.choice(arms[b])
            left, right = (run_a, run_b) if rng.random() < 0.5 else (run_b, run_a)
            rows.append(dict(page=page, prompt_idx=i, image=j, prompt=prompts[i], a=a, b=b, left=left, right=right,
                             check=False))
        for _ in range(attention_checks):
            i, run = rng.randrange(len(prompts)), rng.choice(arms[rng.choice((a, b))])
            rows.append(dict(page=page, prompt_idx=i, image=rng.randrange(k), prompt=prompts[i], a=a, b=b, left=run,
                             right=run, check=True))
        rng.shuffle(rows)
        for n, row in enumerate(rows):
            row["id"] = f"{page}-q{n:03d}"  # ids say nothing about the models
        pairs += rows
        pages.append(dict(page=page, a=a, b=b))
    key = dict(criteria=list(criteria), comparisons=[list(c) for c in comparisons], pages=pages, pairs=pairs)
    key = dict(kit_id=kit_hash(key), **key)

    def data_uri(run: str, row: dict) -> str:
        buf = io.BytesIO()  # JPEG keeps a 100-pair kit of 512 px images near 10 MB; the PNGs stay on disk
        Image.open(image_file(run, row["prompt_idx"], row["image"])).convert("RGB").save(buf, "JPEG", quality=92)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()

    kit, key_file = out / "rating_kit", out / "rating_key.json"
    kit.mkdir(parents=True, exist_ok=True)
    for old in [*kit.glob("page_*.html"), kit / "key.json"]:  # the folder holds this kit's pages and nothing else
        old.unlink(missing_ok=True)  # (an earlier kit's pages, or its key: this file used to write key.json there)
    for p in pages:
        page = dict(kit_id=key["kit_id"], page=p["page"], pixelated=pixelated,
                    questions=[dict(id=c, text=QUESTIONS[c], hide_prompt=c == "appeal") for c in criteria],
                    pairs=[dict(id=r["id"], prompt=r["prompt"], left=data_uri(r["left"], r),
                                right=data_uri(r["right"], r)) for r in pairs if r["page"] == p["page"]])
        # "<" as \u003c: no prompt text can close the <script> element that holds the JSON
        (kit / f"{p['page']}.html").write_text(PAGE.replace("__KIT_JSON__", json.dumps(page).replace("<", "\\u003c")))
    key_file.write_text(json.dumps(key, indent=1))
    return kit, key_file


# ------------------------------------------------------------------------------------------------ ingest


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of counts (N items, K categories): counts[i, c] = raters who put item i in category c. Items
    rated by n_i >= 2 raters count; with equal n_i this is Fleiss (1971):

        P_i = (sum_c n_ic^2 - n_i) / (n_i (n_i - 1)),  P_bar = mean_i P_i,  p_c = sum_i n_ic / sum_i n_i,
        P_e = sum_c p_c^2,  kappa = (P_bar - P_e) / (1 - P_e)

    P_i is the fraction of item i's rater pairs that agree; 1 is perfect agreement, 0 what chance gives. NaN when
    no item has two raters, or every judgement falls in one category (P_e = 1).
    """
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts.sum(axis=1) >= 2]
    if len(counts) == 0:
        return math.nan
    n_i = counts.sum(axis=1)
    p_bar = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_e = ((counts.sum(axis=0) / n_i.sum()) ** 2).sum()
    return float((p_bar.mean() - p_e) / (1 - p_e)) if p_e < 1 else math.nan


def read_rater_file(file: str, key: dict, pairs: dict) -> dict:
    """One rater file as the kit saves it, checked: {kit_id, page, rater, choices: {pair id: {criterion: side}}}.
    Every defect is an error that names the file (a broken or foreign file must never reach the table)."""
    try:
        record = json.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a rater file the kit saved (unreadable or not JSON: {e})") from None
    require(isinstance(record, dict), f"{file}: expected a JSON object with kit_id, rater and choices")
    require(record.get("kit_id") == key["kit_id"],
            f"{file}: kit_id {record.get('kit_id')!r} is not this key's {key['kit_id']!r} (another kit?)")
    choices = record.get("choices")
    require(isinstance(choices, dict), f"{file}: 'choices' is missing or not an object of pair id -> answers")
    require(len(choices) > 0, f"{file}: no choices (an empty rating file; the ratings table is left as it was)")
    for pid, answer in choices.items():
        require(pid in pairs, f"{file}: pair {pid!r} is not in the key")
        require(isinstance(answer, dict) and set(answer) <= set(key["criteria"]) and
                all(v in ("left", "right", "tie") for v in answer.values()),
                f"{file}: pair {pid!r}: expected {{criterion: left|right|tie}} over {key['criteria']}, got {answer!r}")
    rater = record.get("rater") or Path(file).stem
    require(isinstance(rater, str), f"{file}: 'rater' must be a name")
    return dict(rater=rater, choices=choices)


def ingest_ratings(rater_files: tuple[str, ...], key_path: str, confidence: float, n_resamples: int, seed: int,
                   max_attention_failures: int | None = 0) -> dict:
    """Un-blind every rater's choices with the key. Per criterion, comparison (A, B) and pair i, x_i = mean over the
    raters of 1 (A chosen), 1/2 (tie), 0 (B chosen); the win rate mean_i x_i gets a BCa interval over pairs, the sign
    test counts pairs with x_i > 1/2 against x_i < 1/2, Wilcoxon tests x_i - 1/2, Holm runs across every criterion x
    comparison; Fleiss' kappa over {A, tie, B} per criterion (all comparisons' pairs) and per cell. Attention-check
    pairs (one image on both sides) must be answered tie on every question, on every page the rater answered: a
    rater with more failures (answers other than tie, and check questions left unanswered) than
    max_attention_failures is excluded (None: nobody), and every rater's failures are reported."""
    key = json.loads(Path(key_path).read_text())
    require(kit_hash(key) == key.get("kit_id"), f"{key_path}: its content does not hash to its kit_id "
            f"{key.get('kit_id')!r}: the key was edited after the kit was made; use the key the kit was made with")
    pairs, criteria = {row["id"]: row for row in key["pairs"]}, key["criteria"]
    answers: dict[str, dict[str, dict]] = {}  # rater -> pair id -> {criterion: side}
    for file in rater_files:
        r = read_rater_file(file, key, pairs)
        mine = answers.setdefault(r["rater"], {})
        require(not set(mine) & set(r["choices"]), f"{file}: rater {r['rater']!r} answered these pairs in another "
                "file too (the same file given twice?)")
        mine |= r["choices"]
    # Attention checks: every check question of every page a rater answered is asked; an answer other than tie and a
    # question left unanswered both fail, so a file that skips the checks cannot pass them.
    failures, checks, unanswered = {}, {}, {}
    for rater, mine in answers.items():
        pages = {pairs[pid]["page"] for pid in mine}
        asked = [(pid, c) for pid, row in pairs.items() if row["check"] and row["page"] in pages for c in criteria]
        given = [mine[pid][c] for pid, c in asked if c in mine.get(pid, {})]
        checks[rater], unanswered[rater] = len(asked), len(asked) - len(given)
        failures[rater] = unanswered[rater] + sum(v != "tie" for v in given)
    excluded = [r for r, f in failures.items() if max_attention_failures is not None and f > max_attention_failures]
    raters = [r for r in answers if r not in excluded]
    require(raters, f"every rater failed the attention checks ({failures}); nothing to report")
    results, kappas = [], {}
    for crit in criteria:
        votes: dict[str, dict[str, float]] = {}  # pair id -> rater -> 1 (A chosen), 1/2 (tie), 0 (B chosen)
        for rater in raters:
            for pid, answer in answers[rater].items():
                row = pairs[pid]
                if row["check"] or crit not in answer:
                    continue
                run = {"left": row["left"], "right": row["right"], "tie": None}[answer[crit]]  # un-blinded
                votes.setdefault(pid, {})[rater] = 0.5 if run is None else float(run.partition("_run")[0] == row["a"])
        all_counts = []
        for a, b in key["comparisons"]:
            ids = [pid for pid, r in pairs.items() if (r["a"], r["b"]) == (a, b) and pid in votes]
            x = np.array([np.mean(list(votes[pid].values())) for pid in ids])  # (pairs rated,)
            if len(x) == 0:
                continue
            counts = np.array([[sum(v == c for v in votes[pid].values()) for c in (1.0, 0.5, 0.0)] for pid in ids])
            all_counts.append(counts)
            wins, ties, losses, p_sign = sign_test(x - 0.5)
            results.append(dict(criterion=crit, a=a, b=b, n_pairs=len(x), n_judgements=int(counts.sum()),
                                win_rate=float(x.mean()), ci_win=bca_interval(x, confidence, n_resamples, seed),
                                wins=wins, ties=ties, losses=losses, p_sign=p_sign, p_wilcoxon=wilcoxon_test(x - 0.5),
                                fleiss_kappa=fleiss_kappa(counts)))
        kappas[crit] = fleiss_kappa(np.concatenate(all_counts)) if all_counts else math.nan
    for test in ("p_sign", "p_wilcoxon"):
        for c, adjusted in zip(results, holm([c[test] for c in results])):
            c[test + "_holm"] = adjusted
    return dict(kit_id=key["kit_id"], criteria=criteria, raters=raters, excluded=excluded,
                attention=dict(failures=failures, checks=checks, unanswered=unanswered,
                               max_failures=max_attention_failures),
                fleiss_kappa=kappas, comparisons=results)


def ratings_markdown(r: dict) -> str:
    lines = [f"# Human ratings: {len(r['raters'])} raters ({', '.join(r['raters'])})", ""]
    att = r["attention"]
    lines += ["Attention checks (one image on both sides; every answer should be tie): " + ", ".join(
        f"{rater} {att['failures'][rater]}/{att['checks'][rater]} wrong" +
        (f" ({att['unanswered'][rater]} unanswered)" if att["unanswered"][rater] else "")
        for rater in att["failures"]) +
        (f"; excluded (more than {att['max_failures']} wrong): {', '.join(r['excluded'])}" if r["excluded"] else ""),
        "", "Fleiss' kappa per criterion (all comparisons): " + ", ".join(
        f"{c} {k:.3f}" for c, k in r["fleiss_kappa"].items()), "",
        "| criterion | A vs B | pairs | judgements | A win rate [CI] | W/T/L (pairs) | sign p (Holm) | Wilcoxon p "
        "(Holm) | Fleiss' kappa |", "|---|---|---|---|---|---|---|---|---|"]
    for c in r["comparisons"]:
        lines.append(f"| {c['criterion']} | {c['a']} vs {c['b']} | {c['n_pairs']} | {c['n_judgements']} | "
                     f"{fmt(c['win_rate'], c['ci_win'])} | {c['wins']}/{c['ties']}/{c['losses']} | "
                     f"{c['p_sign']:.3g} ({c['p_sign_holm']:.3g}) | {c['p_wilcoxon']:.3g} ({c['p_wilcoxon_holm']:.3g})"
                     f" | {c['fleiss_kappa']:.3f} |")
    return "\n".join(lines) + "\n"


def write_ratings(rater_files: tuple[str, ...], key_path: str, confidence: float, n_resamples: int, seed: int,
                  max_attention_failures: int | None = 0) -> dict:
    """ingest_ratings, then ratings.json and ratings.md beside the key (written only once every file has passed)."""
    result = ingest_ratings(rater_files, key_path, confidence, n_resamples, seed, max_attention_failures)
    out = Path(key_path).parent
    (out / "ratings.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "ratings.md").write_text(ratings_markdown(result))
    print(ratings_markdown(result) + f"\nwrote {out / 'ratings.json'} and {out / 'ratings.md'}")
    return result


# ------------------------------------------------------------------------------------------------ the page
# One page per comparison: __KIT_JSON__ becomes {kit_id, page, pixelated, questions, pairs} (export_rating_kit).

PAGE = r"""<!doctype html>
<!-- A double-blind rating page that rating_kit.py writes (rating_kit/page_NN.html, one per comparison). Self-contained: the images
     are inlined as data URIs and nothing is fetched, so a rater can open it offline. Model names never appear here;
     which model is left or right is in rating_key.json, which stays with the experimenter. -->
<html lang="en">
<head>
<meta charset="utf-8">
<title>Which image is better?</title>
<style>
  /* One screen, no scrolling: the page is a column as tall as the window, and the images take whatever height the
     text leaves, so the answer buttons stay in view (tests/test_rating_kit.py checks it at a 1280x900 window). */
  html, body { height: 100%; }
  body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 0 auto; padding: 0.5em 1em; color: #222;
         box-sizing: border-box; display: flex; flex-direction: column; }
  header { display: flex; flex-wrap: wrap; align-items: center; gap: 0.3em 1.2em; }
  h1 { font-size: 1.5em; margin: 0; }
  #help { font-size: 0.9em; color: #444; margin: 0.4em 0; }
  #question { font-size: 1.2em; font-weight: bold; margin: 0.2em 0; }
  #prompt { font-size: 1.25em; margin: 0.1em 0 0.4em; min-height: 2.5em; }
  .pair { flex: 1 1 0; min-height: 120px; display: flex; gap: 2em; justify-content: center; }
  .pair img { height: 100%; max-height: 512px; max-width: 44%; aspect-ratio: 1; object-fit: contain;
              background: #eee; }
  .pixelated img { image-rendering: pixelated; }
  .answers { display: flex; justify-content: center; align-items: center; gap: 0.8em; margin: 0.6em 0 0.2em; }
  button { font-size: 1em; padding: 0.4em 1em; }
  .answers .choice { font-size: 1.15em; padding: 0.5em 1.8em; }
  #back { margin-right: 2em; }
  #progress, #status { color: #555; }
</style>
</head>
<body>
<header>
  <h1>Which image is better?</h1>
  <label>Your name: <input id="rater" autocomplete="off"></label>
  <span id="progress"></span>
  <button id="save">Save ratings</button>
  <span id="status"></span>
</header>
<p id="help">Each pair of images is asked up to three questions, one after the other. For the first, the text is
  hidden: judge the images alone. If you cannot decide, choose <i>tie</i>. Keys: <b>&larr;</b> left, <b>&darr;</b> or
  <b>t</b> tie, <b>&rarr;</b> right, <b>Backspace</b> back. Your choices are kept in this browser as you go; press
  <b>Save ratings</b> to download the file to send back (you can save more than once).</p>
<div id="question"></div>
<div id="prompt"></div>
<div class="pair" id="pair"><img id="left" alt="left image"><img id="right" alt="right image"></div>
<div class="answers">
  <button id="back">Back</button>
  <button class="choice" id="choose-left">Left (&larr;)</button>
  <button class="choice" id="choose-tie">Tie (&darr;)</button>
  <button class="choice" id="choose-right">Right (&rarr;)</button>
</div>
<script id="kit" type="application/json">__KIT_JSON__</script>
<script>
"use strict";
// {kit_id, page, pixelated, questions: [{id, text, hide_prompt}], pairs: [{id, prompt, left, right}]}
const kit = JSON.parse(document.getElementById("kit").textContent);
const storeKey = "rating-kit-" + kit.kit_id + "-" + kit.page;
const saved = JSON.parse(localStorage.getItem(storeKey) || "{}");
const choices = saved.choices || {};  // pair id -> {question id: "left" | "right" | "tie"}
const $ = (id) => document.getElementById(id);
const Q = kit.questions.length;
$("rater").value = saved.rater || "";
if (kit.pixelated) $("pair").classList.add("pixelated");
// position = pair index * Q + question index; start at the first unanswered question
let position = 0;
while (position < kit.pairs.length * Q &&
       kit.questions[position % Q].id in (choices[kit.pairs[Math.floor(position / Q)].id] || {})) position += 1;

function persist() {
  localStorage.setItem(storeKey, JSON.stringify({ rater: $("rater").value.trim(), choices }));
}

function show() {
  const done = Object.values(choices).filter((c) => Object.keys(c).length === Q).length;
  $("progress").textContent = `${done} of ${kit.pairs.length} pairs rated`;
  document.body.dataset.index = Math.floor(position / Q);  // for scripted checks: which pair and question are shown
  document.body.dataset.question = position < kit.pairs.length * Q ? kit.questions[position % Q].id : "";
  if (position >= kit.pairs.length * Q) {
    $("question").textContent = "";
    $("prompt").textContent = "All pairs rated. Thank you! Press Save ratings and send the downloaded file.";
    $("pair").style.visibility = "hidden";
    return;
  }
  const pair = kit.pairs[Math.floor(position / Q)], question = kit.questions[position % Q];
  const previous = (choices[pair.id] || {})[question.id];
  $("pair").style.visibility = "visible";
  $("question").textContent = question.text + (previous ? `  (you chose: ${previous})` : "");
  $("prompt").textContent = question.hide_prompt ? "" : `"${pair.prompt}"`;
  $("left").src = pair.left;
  $("right").src = pair.right;
}

function choose(choice) {
  if (position >= kit.pairs.length * Q) return;
  const pair = kit.pairs[Math.floor(position / Q)];
  choices[pair.id] = Object.assign(choices[pair.id] || {}, { [kit.questions[position % Q].id]: choice });
  persist();
  position += 1;
  show();
}

function save() {
  const rater = $("rater").value.trim();
  if (!rater) { $("status").textContent = "Please enter your name first."; $("rater").focus(); return; }
  persist();
  const record = { kit_id: kit.kit_id, page: kit.page, rater, saved_at: new Date().toISOString(), choices };
  const blob = new Blob([JSON.stringify(record, null, 1)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `ratings-${rater.replace(/[^\w.-]+/g, "_")}-${kit.page}.json`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  $("status").textContent = `Saved the answers for ${Object.keys(choices).length} of ${kit.pairs.length} pairs to ${link.download}.`;
}

$("choose-left").onclick = () => choose("left");
$("choose-tie").onclick = () => choose("tie");
$("choose-right").onclick = () => choose("right");
$("back").onclick = () => { position = Math.max(0, position - 1); show(); };
$("save").onclick = save;
$("rater").oninput = persist;
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT") return;
  const action = { ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", t: "tie" }[e.key];
  if (action) { e.preventDefault(); choose(action); }
  if (e.key === "Backspace") { e.preventDefault(); $("back").click(); }
});
show();
</script>
</body>
</html>
"""


# ------------------------------------------------------------------------------------------------ main


def main(args: Args) -> dict:
    """Ingest: the same checks and messages as `python evaluate.py --ingest-ratings`, then write_ratings."""
    require(len(args.ingest_ratings) > 0, "--ingest-ratings: give the rater files the kit's pages saved")
    require(args.rating_key is not None, "--ingest-ratings needs --rating-key rating_key.json")
    require(0 < args.confidence < 1, f"--confidence {args.confidence}: must be in (0, 1)")
    require(args.n_resamples >= 100, f"--n-resamples {args.n_resamples}: BCa needs at least a few hundred")
    return write_ratings(args.ingest_ratings, args.rating_key, args.confidence, args.n_resamples, args.seed,
                         args.max_attention_failures)


if __name__ == "__main__":
    main(tyro.cli(Args))
