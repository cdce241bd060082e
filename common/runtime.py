"""Engineering that every training script shares and no method owns.

Distributed setup, seeding, checkpoints that resume exactly, metrics, guard rails and image grids.
Nothing here knows about diffusion, preferences or rewards; read a script first, then this file.

    dist = setup_distributed()                       # torchrun or a single process
    check_model_path(args.model, "--model")          # before the data loads: a typo fails in a second
    prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite, is_main=dist.is_main)
    seed_everything(args.seed, dist.rank)
    logger = MetricsLogger(args.output_dir, enabled=dist.is_main, resume_step=start_step)
    ...
    save_checkpoint(args.output_dir, step, {"unet_lora": lora_sd}, {"optimizer": opt.state_dict(), "args": args},
                    generators=[noise_gen])                   # on every rank; rank 0 writes
    step, weights, extra = load_checkpoint(args.output_dir)    # resolves checkpoints/latest
    check_resume_args(extra["args"], args)                     # names any run-defining flag that changed
    set_rng_state(extra["rng"][dist.rank], generators=[noise_gen])
"""

import dataclasses
import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from torch.utils.tensorboard import SummaryWriter

# ------------------------------------------------------------------------------------------------ distributed


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """One process per GPU under `torchrun` (it sets RANK/WORLD_SIZE/LOCAL_RANK); otherwise a single process."""
    use_cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # else every rank allocates on cuda:0 and NCCL collectives hang
        # device_id binds the group to this GPU, so barrier() need not guess which device to use.
        tdist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        tdist.init_process_group("gloo", rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_mean(tensor: torch.Tensor | float, dist: Dist) -> torch.Tensor:
    """Mean over ranks of a (detached) metric, so rank 0 logs the whole batch rather than its shard. Collective:
    every rank must call it. The input is not modified."""
    t = torch.as_tensor(tensor, device=dist.device).detach().clone()  # NCCL only reduces tensors on the GPU
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t /= tdist.get_world_size()
    return t


def gather(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Concatenate a tensor over ranks (rank order), e.g. rewards for batch statistics; collective."""
    if dist.world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.world_size)]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------ seeding and RNG


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and every GPU) with `seed + rank` and return it.

    The per-rank offset gives each GPU different noise and timesteps; with one seed they would all draw the same
    samples and add nothing. Initial weights still agree because DDP broadcasts rank 0's parameters.
    """
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def rng_state(generators: list[torch.Generator] = ()) -> dict:
    """This process's random streams (python, numpy's global one, torch CPU, the current GPU, and `generators`),
    held in types that `torch.load(weights_only=True)` accepts: ints, lists, tensors."""
    py_version, py_internal, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device, i.e. this rank's GPU
    return state


def set_rng_state(state: dict, generators: list[torch.Generator] = ()) -> None:
    """Inverse of `rng_state`. Call it after all set-up that draws random numbers (model init, data loaders), so
    the training loop continues exactly where the saved run stood."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    require(len(generators) == len(state["generators"]),
            f"generators: got {len(generators)}, the checkpoint saved {len(state['generators'])}")
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


# ------------------------------------------------------------------------------------------------ checkpoints
# Layout:  output_dir/checkpoints/step_0001000/{<name>.safetensors..., state.pt}  and  checkpoints/latest
# A checkpoint is written to a hidden `.tmp-*` folder and renamed into place (os.replace is atomic on POSIX), and
# only then does `latest` move to it, itself by rename. A crash at any point leaves `latest` on a complete folder.

_STEP_DIR = re.compile(r"step_\d+")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest step first. Temporary folders of an interrupted save do not match."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    pointer = Path(output_dir) / "checkpoints" / "latest"
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


def save_checkpoint(output_dir: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], extra: dict,
                    *, generators: list[torch.Generator] = (), keep_last: int | None = 2,
                    script: str | None = None) -> Path:
    """Save `weights` (file name -> state dict, one safetensors file each, loadable without this code) and
    `extra` (optimizer and scheduler state dicts, Args, anything small) plus every rank's RNG state.

    Collective: call it on every rank. Only rank 0 writes; the others hand over their RNG state and wait.
    `extra` is converted to types `torch.load(weights_only=True)` accepts (dataclass -> dict, Path -> str, numpy ->
    tensor); anything else raises here rather than at resume time. Keeps the newest `keep_last` (None: all).
    `script` (e.g. "dpok.py") is stored, so that resuming with another script says so instead of a KeyError.
    """
    require("rng" not in extra, "extra: the key 'rng' is reserved for the RNG states save_checkpoint adds")
    require(keep_last is None or keep_last >= 1, f"keep_last must be >= 1 or None, got {keep_last}")
    extra = _plain(extra, keep_tensors=True)  # before touching the disk, so a bad value fails cleanly
    rngs = [rng_state(generators)]
    if tdist.is_initialized():  # each rank has its own streams (seed + rank); rank 0 stores them all
        rngs = [None] * tdist.get_world_size()
        tdist.all_gather_object(rngs, rng_state(generators))
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a save that crashed
            shutil.rmtree(stale)
        tmp = root / f".tmp-{final.name}"
        try:
            tmp.mkdir()
            for name, state_dict in weights.items():
                # safetensors wants contiguous CPU tensors that share no storage, hence a copy per tensor.
                save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()},
                          str(tmp / f"{name}.safetensors"))
            torch.save({"step": step, "rng": rngs, "extra": extra, "script": script}, tmp / "state.pt")
            for f in tmp.iterdir():  # on disk before the rename, or a power cut could publish empty files
                _fsync(f)
        except (OSError, RuntimeError) as e:
            if not _disk_full(e, root):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the half-written folder would only hold the space
            last = latest_checkpoint(output_dir)
            raise OSError(errno.ENOSPC, f"no space left on device: checkpoint {final} was not saved ("
                          + (f"the latest one, {last}, is intact" if last else "no earlier checkpoint exists")
                          + f"). Free space on the disk of {root}, then continue with --resume") from e
        if final.exists():  # re-saving a step after resuming from an earlier checkpoint: swap, then delete
            os.replace(final, root / f".tmp-old-{final.name}")
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")
        _fsync(root)
        shutil.rmtree(root / f".tmp-old-{final.name}", ignore_errors=True)
        if keep_last is not None:
            # Prune by step among checkpoints up to this one; later steps belong to a run we resumed before and
            # are overwritten when reached. The new checkpoint is in place, so deleting the old ones is safe.
            for old in [p for p in list_checkpoints(output_dir) if int(p.name[5:]) <= step][:-keep_last]:
                shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(path: str | Path,
                    script: str | None = None) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict]:
    """(step, weights, extra) from a checkpoint folder, or from an output dir: its `latest` checkpoint, or, if that
    one does not load (a half-written step: a kill or power cut inside a save on a filesystem without atomic
    rename, a torn `latest`), the newest earlier checkpoint that does, with a warning naming what was passed over.
    `extra["rng"][rank]` holds each rank's RNG state for `set_rng_state`. Tensors are loaded on the CPU.
    With `script`, a checkpoint that another script wrote is refused with both names."""
    path = Path(path)
    if (path / "state.pt").exists():
        return _load_one(path, script)
    pointer = path / "checkpoints" / "latest"
    name = pointer.read_text().strip() if pointer.is_file() else ""
    latest = pointer.parent / name if _STEP_DIR.fullmatch(name) else None  # None: no pointer, or a torn one
    # The latest checkpoint first, then older ones; never a later step left by a longer run we resumed before.
    candidates = [p for p in reversed(list_checkpoints(path)) if latest is None or int(p.name[5:]) <= int(name[5:])]
    if latest is not None and latest not in candidates:
        candidates.insert(0, latest)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint at {path} (neither state.pt nor checkpoints/step_*)")
    passed_over = []
    for candidate in candidates:
        try:
            loaded = _load_one(candidate, script)
        except _WrongScript:
            raise
        except Exception as e:  # incomplete: missing or truncated files
            passed_over.append(f"{candidate.name} ({type(e).__name__}: {str(e)[:120]})")
            continue
        if passed_over:
            warnings.warn(f"{path}: resuming from {candidate.name}; passed over incomplete {', '.join(passed_over)}")
        return loaded
    raise FileNotFoundError(f"no complete checkpoint at {path}: {', '.join(passed_over)}")


class _WrongScript(ValueError):
    pass


def _load_one(path: Path, script: str | None) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict]:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)  # never unpickle code
    saved_by = state.get("script")
    if script is not None and saved_by is not None and saved_by != script:
        raise _WrongScript(f"{path} is a checkpoint of {saved_by}, not of {script}: resume a run with the script "
                           f"that wrote it")
    weights = {f.name.removesuffix(".safetensors"): load_file(f) for f in sorted(path.glob("*.safetensors"))}
    return state["step"], weights, {**state["extra"], "rng": state["rng"]}


# ------------------------------------------------------------------------------------------------ cache keys
# A cache is keyed by what determines its content, never by a name: a data file corrected in place or a model
# retrained into the same folder must not reuse what was computed from the old bytes (docs/data_and_runs.md).

_FILE_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns, ctime_ns, inode) -> sha256: each file hashed once


def _file_digest(file: Path) -> str:
    """sha256 of a file's bytes, memoised for this process by its stat. ctime is in the memo key because no user call
    can set it back (os.utime sets mtime only): a file rewritten in place, even with its mtime restored, is hashed
    again. The memo only saves hashing one file twice in one process; nothing of it is written to disk."""
    st = file.stat()
    memo = (str(file), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def fingerprint(*sources: str | Path | None, dist: Dist | None = None) -> str:
    """A content key of files, folders and hub ids: sha256 over every file's relative name, size and sha256 (a folder
    recursively), so equal bytes give equal keys wherever they lie and any changed byte gives another key. A hub id
    is keyed by its name alone (its snapshot may not be downloaded yet when a key is made: pass a local folder to key
    by bytes); None by "None". Cost: one read of the bytes per process (about 1 s per GB); with `dist` the files are
    shared out among the ranks and the digests gathered."""
    entries, files = [], []
    for source in sources:
        path = Path(source).expanduser() if source is not None else None
        if path is None or not path.exists():
            entries.append(["id", str(source)])
            continue
        found = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        for f in found:
            entries.append(["file", f.name if f == path else str(f.relative_to(path)), f.stat().st_size])
            files.append((len(entries) - 1, f))
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = {k: _file_digest(f) for k, f in files[rank::world]}
    if world > 1:
        parts = [None] * world
        tdist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    for k, _ in files:
        entries[k].append(mine[k])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# Flags that may change between a run and its --resume: how long, where, how often to log or save, and how fast.
# Everything else defines the run (data, model, seed, batch, learning rate...) and must match.
RESUME_MAY_CHANGE = frozenset({
    "resume", "stop_at_step", "steps", "output_dir", "overwrite", "toy", "num_workers",
    "log_every", "checkpoint_every", "sample_every", "eval_every", "compile", "compile_unet",
    "gradient_checkpointing", "cache_dir", "cache_latents", "embed_batch_size"})


def check_resume_args(saved: dict, args, may_change: frozenset[str] = RESUME_MAY_CHANGE) -> None:
    """Refuse a --resume whose run-defining arguments differ from the checkpoint's `args` (a dict), naming each with
    both values. Fields one side lacks (a flag added since) are not compared."""
    now = _plain(args, keep_tensors=False, where="args")
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in sorted(now.keys() & saved.keys())
               if k not in may_change and _plain(saved[k], keep_tensors=False) != now[k]]
    require(not changed, f"--resume: run-defining arguments differ from the checkpoint's run: {'; '.join(changed)}. "
            "Resume with the same ones, or start a new run in another --output-dir")


def _disk_full(error: Exception, folder: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC, or torch.save's C++ stream error (`basic_ios::clear:
    iostream error`, which carries no errno) on a disk with under 1 MiB free."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return "iostream error" in str(error) and shutil.disk_usage(folder).free < 2**20


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(obj, keep_tensors: bool, where: str = "extra"):
    """Recursively convert to containers of primitives (and tensors when keep_tensors), or raise TypeError."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v, keep_tensors, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):  # tuples stay tuples: torch.optim expects e.g. `betas` back as a tuple
        items = [_plain(v, keep_tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if keep_tensors else obj.tolist()
    raise TypeError(f"{where} has type {type(obj).__name__}, which a weights_only / JSON file cannot hold")


# ------------------------------------------------------------------------------------------------ metrics


# What a training script writes into its --output-dir; --overwrite removes exactly these, nothing else.
RUN_OUTPUTS = ("args.json", "metrics.jsonl", "eval.json", "tb", "checkpoints", "samples", "final",
               "latent_cache")  # diffusion_dpo.py's caches when --cache-dir is not given


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool = False, is_main: bool = True) -> Path:
    """Refuse to start a new run in a non-empty `output_dir`: the old run's metrics, final weights and eval.json
    would be replaced and its checkpoints, samples and TensorBoard events mixed into the new run's. With `resume`
    the folder may hold anything; with `overwrite` the previous run's outputs (RUN_OUTPUTS) are deleted first
    and anything else in the folder is left alone. Collective under torchrun: every rank checks, rank 0 deletes."""
    out = Path(output_dir)
    if not resume and out.exists() and any(out.iterdir()):  # resuming: load_checkpoint says if there is none
        entries = sorted(p.name for p in out.iterdir())
        if not overwrite:
            raise FileExistsError(f"--output-dir {out} is not empty ({', '.join(entries[:6])}"
                                  f"{', ...' if len(entries) > 6 else ''}): pass --resume to continue that run, "
                                  "--overwrite to replace it, or choose another --output-dir")
        barrier()  # every rank has looked before rank 0 deletes
        if is_main:
            for name in RUN_OUTPUTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    barrier()
    return out


def write_args(output_dir: str | Path, args) -> None:
    """`args.json`: the run's configuration, next to its metrics."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "args.json").write_text(json.dumps(_plain(args, keep_tensors=False, where="args"),
                                                           indent=2) + "\n")


class MetricsLogger:
    """`metrics.jsonl` (one {"step": .., **metrics} object per `log`) and TensorBoard events under `tb/`.

    Names follow CleanRL's namespaces: `losses/...`, `charts/...`. With `resume_step=k` both logs drop whatever
    an interrupted run wrote after step k, so a resumed run's log equals an uninterrupted one. Without it the
    JSONL file starts afresh. `enabled=False` (ranks other than 0) makes every method a no-op.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError):  # a line torn by the crash
                    pass
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a" if resume_step is not None else "w")
        # purge_step discards TensorBoard events at steps >= it that the interrupted run had written.
        self.tb = SummaryWriter(str(out / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, metrics: dict[str, float | torch.Tensor], step: int) -> None:
        """Tensors are read with .item(), which waits for the GPU: log every few steps, not every step."""
        if not self.enabled:
            return
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        # NaN and inf are not JSON; null keeps every line parseable by strict readers.
        row = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def log_images(self, tag: str, grid: torch.Tensor | Image.Image, step: int) -> None:
        """A (3, H, W) tensor in [0, 1] or a PIL image, e.g. what `save_image_grid` returns."""
        if not self.enabled:
            return
        if isinstance(grid, Image.Image):
            self.tb.add_image(tag, np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        else:
            self.tb.add_image(tag, grid.detach().float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


# ------------------------------------------------------------------------------------------------ guard rails


def require(cond: bool, msg: str) -> None:
    """Argument checks that survive `python -O` (unlike assert). Name the bad argument in `msg`."""
    if not cond:
        raise ValueError(msg)


def check_model_path(model: str, flag: str = "--model") -> None:
    """A local pipeline folder that does not exist is named as such, at start-up (before any data loads), rather than
    reported later by the hub client as a malformed repo id. A hub id (`owner/name`) passes untouched."""
    path = Path(model).expanduser()
    if path.exists():
        require(path.is_dir() and (path / "model_index.json").is_file(),
                f"{flag} {model}: not a diffusers pipeline folder (no model_index.json)")
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) is None or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{flag} {model}: no such local folder (and not a hub id of the form owner/name)")


def check_resolution(model: str, resolution: int, flag: str = "--resolution") -> None:
    """At start-up: `resolution` must be a multiple of the VAE's downsampling factor (2^(blocks − 1): 8 for SD1.5)
    and of 8, which diffusers' pipelines require of height and width. (The UNet pads a latent of any size.)"""
    from diffusers import AutoencoderKL

    vae_factor = 2 ** (len(AutoencoderKL.load_config(model, subfolder="vae")["block_out_channels"]) - 1)
    factor = math.lcm(vae_factor, 8)
    require(resolution >= factor and resolution % factor == 0,
            f"{flag} {resolution}: must be a positive multiple of {factor} (the VAE downsamples by {vae_factor}; "
            f"diffusers' pipelines need a multiple of 8), e.g. {max(factor, resolution // factor * factor)}")


def absolute(path: str | Path) -> str:
    """A local path made absolute (so a printed line works from any folder); a hub id unchanged."""
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else str(path)


def below_base_warning(final: float, base: float, reward: str = "reward") -> str | None:
    """A training run exits 0 even when it made the model worse; this says so where it is seen (stderr, and the
    returned message for eval.json) when the trained model's mean `reward` is below the base model's."""
    if final >= base:
        return None
    message = f"the trained model's {reward} is BELOW the base model's ({final:.4g} < {base:.4g})"
    print(f"WARNING: {message}", file=sys.stderr)
    return message


def check_finite(loss: torch.Tensor | float, step: int, output_dir: str | Path | None = None) -> None:
    """Stop on a NaN/inf loss before it reaches a checkpoint. Reads the value back to the host, so it waits for
    the GPU: call it on log steps or after accumulation, on the all-reduced loss so every rank stops together."""
    loss = torch.as_tensor(loss).detach()
    if bool(torch.isfinite(loss).all()):
        return
    value = loss.item() if loss.numel() == 1 else f"{int((~torch.isfinite(loss)).sum())} non-finite entries"
    last = latest_checkpoint(output_dir) if output_dir is not None else None
    where = f"the last good checkpoint is intact at {last}" if last else "no checkpoint has been saved yet"
    raise FloatingPointError(f"loss is {value} at step {step}; {where}. Lower the learning rate or check the data.")


# ------------------------------------------------------------------------------------------------ images


def save_image_grid(images: torch.Tensor | list[Image.Image], path: str | Path, nrow: int = 8,
                    captions: list[str] | None = None, upscale: int = 1, padding: int = 2) -> Image.Image:
    """Tile (N, 3, H, W) images in [0, 1] (or PIL images) into a PNG, `nrow` per row, with a caption under each
    tile when given. `upscale` enlarges by nearest neighbour so 8x8 toy images stay crisp. Returns the grid."""
    if isinstance(images, torch.Tensor):
        arr = (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
        images = [Image.fromarray(a.numpy()) for a in arr]
    require(len(images) > 0, "images: empty")
    require(captions is None or len(captions) == len(images),
            f"captions: {len(captions or [])} given for {len(images)} images")
    w, h = images[0].width * upscale, images[0].height * upscale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [_wrap(c, font, measure, w) for c in captions] if captions else [[] for _ in images]
    line_h = font.getbbox("Ag")[3] + 2
    cap_h = max(len(ls) for ls in lines) * line_h
    cols = min(nrow, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (w + padding) + padding, rows * (h + cap_h + padding) + padding), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, ls) in enumerate(zip(images, lines)):
        x = padding + (i % cols) * (w + padding)
        y = padding + (i // cols) * (h + cap_h + padding)
        grid.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(ls):
            draw.text((x, y + h + j * line_h), line, fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def _wrap(text: str, font, draw: ImageDraw.ImageDraw, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to the tile width; long prompts end in '...' after `max_lines`."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines[:max_lines - 1] + [lines[max_lines - 1] + "..."] if len(lines) > max_lines else lines


# ------------------------------------------------------------------------------------------------ small helpers


def batch_arithmetic(per_device: int, world_size: int, grad_accum: int) -> int:
    """Effective batch = per-device batch x GPUs x accumulation steps (samples per optimizer step)."""
    require(per_device >= 1 and world_size >= 1 and grad_accum >= 1,
            f"batch sizes must be positive: per_device={per_device}, world_size={world_size}, grad_accum={grad_accum}")
    return per_device * world_size * grad_accum


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting, so saved
    keys carry no `module.` / `_orig_mod.` prefix (nanoGPT's pitfall) and load into an unwrapped model."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def reference_unet(unet, ref_unet):
    """The frozen reference/pretrained UNet of every method: a full fine-tune's separate frozen copy (`ref_unet`), or,
    with LoRA (`ref_unet` None), the trained UNet itself with its adapters switched off, so no second copy sits in
    memory; switched back on afterwards. Use under torch.no_grad() unless gradients through it are wanted."""
    if ref_unet is not None:
        yield ref_unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
