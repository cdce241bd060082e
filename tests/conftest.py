"""Shared test set-up: no network, and the toy world built once per session (cached across sessions)."""

import os

# Set before anything imports huggingface_hub, so a stray hub id fails at once with a clear error.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the scripts do: idle OpenMP threads sleep, not spin

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world():
    from common.toy import toy_world

    return toy_world()


@pytest.fixture(scope="session")
def toy_dpo_run(world, tmp_path_factory):
    """`python diffusion_dpo.py --toy`, run once per test session; its output dir (final/unet, eval.json, ...).

    Shared by the Diffusion-DPO end-to-end test and the evaluate.py tests, so the suite trains the toy model once.
    """
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("toy_dpo_run")
    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(repo / "diffusion_dpo.py"), "--toy", "--output-dir", str(out)], check=True, cwd=repo)
    return out
