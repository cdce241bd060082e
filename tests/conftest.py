"""Shared test set-up: no network, and the toy world built once per session (cached across sessions)."""

import os

# Set before anything imports huggingface_hub, so a stray hub id fails at once with a clear error.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the scripts do: idle OpenMP threads sleep, not spin
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N (pytest.ini): the cores shared out, so N workers (and the
    threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))  # scripts they run)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # do not fight over them

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

    from filelock import FileLock

    # One run for the whole session, also under pytest -n: the workers' temporary folders share a parent.
    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "toy_dpo_run"
    repo = Path(__file__).resolve().parent.parent
    with FileLock(str(out) + ".lock"):
        if not (out / "eval.json").exists():
            subprocess.run([sys.executable, str(repo / "diffusion_dpo.py"), "--toy", "--output-dir", str(out),
                            "--overwrite"], check=True, cwd=repo)
    return out



@pytest.fixture(scope="session")
def real_sd15(tmp_path_factory):
    """The real-shape SD1.5 pipeline (benchmarks/real_shapes.py: the published configs, random weights, 4.3 GB),
    built once per test session for every real-shape test file; under pytest -n the workers share it through a file
    lock, as toy_dpo_run. REAL_SHAPES.json is the last file pipeline() writes: a build cut short is redone."""
    from filelock import FileLock

    from benchmarks import real_shapes

    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "real_sd15"
    with FileLock(str(out) + ".lock"):
        if not (out / "REAL_SHAPES.json").exists():
            real_shapes.pipeline("sd15", out)
    return out


@pytest.fixture
def peak_memory(record_property):
    """peak_memory(what, gib): one line of the PEAK MEMORY section pytest_terminal_summary prints (a real-shape run's
    process peak RSS, from benchmarks/real_shapes.run_measured)."""
    import torch

    device = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def report(what: str, peak_gib: float) -> None:
        record_property("peak memory", f"{what}: {peak_gib:.2f} GiB (process peak RSS; device: {device})")

    return report

def pytest_terminal_summary(terminalreporter):
    """The real-shape tests' peak memory (record_property("peak memory", line)), in one section at the end of the log.
    A property travels with its test's report, so the lines show under xdist too, where the workers' output does not."""
    lines = [value for reports in terminalreporter.stats.values() for r in reports if getattr(r, "when", "") == "call"
             for name, value in getattr(r, "user_properties", ()) if name == "peak memory"]
    if lines:
        terminalreporter.section("PEAK MEMORY")
        for line in lines:
            terminalreporter.write_line(line)
