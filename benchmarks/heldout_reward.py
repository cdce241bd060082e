"""The true and the learned toy reward of fixed-seed samples on the held-out toy prompts: the base model against
trained runs, images as units. The quick check behind docs/dpok.md's "On a learned reward" sweep (evaluate.py does
the full evaluation; this draws 12 prompts x --images images per model and nothing else).

    python benchmarks/heldout_reward.py --scorer-path runs/study/rm/final runs/dpok-a runs/dpok-b

Each model draws image j of prompt i from a CPU generator seeded j (DDIM --sample-steps, η --eta, guidance 5, as the
scripts' toy eval.json); p is the two-sided Wilcoxon signed-rank test over the images, paired by prompt and seed.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.scorers import load_scorer  # noqa: E402
from common.toy import HELDOUT_PROMPTS, toy_reward, toy_world  # noqa: E402


def scores(pipe, scorer, images_per_prompt: int, steps: int, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(true toy reward, learned reward), each (n_prompts * images_per_prompt,), prompt-major."""
    true, learned = [], []
    for prompt in HELDOUT_PROMPTS:
        images = torch.cat([pipe(prompt, num_inference_steps=steps, eta=eta, guidance_scale=5.0, output_type="pt",
                                 generator=torch.Generator().manual_seed(j)).images for j in range(images_per_prompt)])
        true.append(toy_reward(images, [prompt] * len(images)))
        learned.append(scorer(images, [prompt] * len(images)))
    return torch.cat(true).numpy(), torch.cat(learned).detach().numpy()


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("runs", nargs="+", help="run folders (their final/unet is loaded)")
    cli.add_argument("--scorer-path", required=True, help="the reward model (reward_model.py's final/ folder)")
    cli.add_argument("--images", type=int, default=8, help="images per held-out prompt")
    cli.add_argument("--sample-steps", type=int, default=20)
    cli.add_argument("--eta", type=float, default=0.0)
    args = cli.parse_args()
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(toy_world().pipeline, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    scorer = load_scorer("reward-model", args.scorer_path, flags=("--scorer-path", "--clip-path"))
    t0, l0 = scores(pipe, scorer, args.images, args.sample_steps, args.eta)
    print(f"base: true {t0.mean():.4f}, learned {l0.mean():.3f}")
    for run in args.runs:
        pipe.unet = UNet2DConditionModel.from_pretrained(Path(run) / "final" / "unet")
        t, lr = scores(pipe, scorer, args.images, args.sample_steps, args.eta)
        p_t, p_l = scipy.stats.wilcoxon(t, t0).pvalue, scipy.stats.wilcoxon(lr, l0).pvalue
        print(f"{run}: true {t.mean():.4f} (p = {p_t:.2g}), learned {lr.mean():.3f} (p = {p_l:.2g})", flush=True)


if __name__ == "__main__":
    main()
