"""GRPO against DPOK on the toy world at the same number of generated images: the validation reward against images.

Both train on the 12 toy training prompts with the toy reward and draw 48 images per iteration for 24 iterations
(1,152 images): `grpo.py --toy` as it is, `dpok.py --toy --prompts <train>` (its multi-prompt recipe, DDPO's per-prompt
advantages) stopped after the same 24 of its 48 iterations. Every 6 iterations each draws its fixed-seed validation
images (48, the toy VALIDATION prompts, the policy's own sampler, image k seeded k) and logs their mean true reward. One
curve per method and seed goes into a picture, and the table gives each run's first and last value. A run whose
eval.json exists is reused (run the same command again to resume, or run the methods' commands side by side).

    python benchmarks/grpo_vs_dpok.py --seeds 4 5 6     # docs/grpo.md's figure and table
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.toy import PROMPT_FILES  # noqa: E402


@dataclasses.dataclass
class Args:
    seeds: tuple[int, ...] = (4, 5, 6)
    """training seeds, one run per method each (seeds 0-3 chose grpo.py's toy recipe: not reported as its result)"""
    output_dir: str = "runs/grpo_vs_dpok"
    """one folder per run, plus curves.png and table.md"""


def commands(seed: int, out: Path) -> dict[str, list[str]]:
    val = ["--validation-prompts", str(PROMPT_FILES["validation"]), "--num-validation-prompts", "48"]
    return {
        "grpo": [sys.executable, "grpo.py", "--toy", "--seed", str(seed), *val,
                 "--output-dir", str(out / f"grpo-s{seed}"), "--overwrite"],
        "dpok": [sys.executable, "dpok.py", "--toy", "--prompts", str(PROMPT_FILES["train"]), "--steps", "24",
                 "--sample-every", "6", "--checkpoint-every", "24", "--seed", str(seed), *val,
                 "--output-dir", str(out / f"dpok-s{seed}"), "--overwrite"],
    }


def curve(run: Path) -> list[tuple[int, float]]:
    """(images generated, validation reward) at every grid; images from the training rows' charts/images."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    images = {r["step"]: r["charts/images"] for r in rows if "charts/images" in r}
    return [(images.get(r["step"], 0), r["rewards/eval_mean"]) for r in rows if "rewards/eval_mean" in r]


def main(args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.output_dir)
    curves = {}
    for seed in args.seeds:
        for method, cmd in commands(seed, out).items():
            if not (out / f"{method}-s{seed}" / "eval.json").exists():
                print(" ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            curves[method, seed] = curve(out / f"{method}-s{seed}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, seed), points in curves.items():
        x, y = zip(*points)
        ax.plot(x, y, "-o" if method == "grpo" else "--s", color="C0" if method == "grpo" else "C1", alpha=0.8,
                label=f"{method} seed {seed}")
    ax.set(xlabel="images generated", ylabel="validation reward (toy, 48 fixed seeds)",
           title="GRPO vs DPOK on the toy world")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    lines = ["| method | seed | reward at 0 images | at 1,152 images | change |", "|---|---|---|---|---|"]
    for (method, seed), points in sorted(curves.items()):
        lines.append(f"| {method} | {seed} | {points[0][1]:.4f} | {points[-1][1]:.4f} | "
                     f"{points[-1][1] - points[0][1]:+.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
