"""Data loading shared by every script: preference pairs, prompt sets, captioned and binary-labelled images.

Layouts read (a `source` is a hub dataset id, a parquet file, or a local folder):
- Pick-a-Pic v2 (`yuvalkirstain/pickapic_v2`, https://arxiv.org/abs/2305.01569): one row per pair, columns
  `caption`, `jpg_0`, `jpg_1` (encoded image bytes), `label_0`, `label_1` (1/0: image 0 preferred, 0/1: image 1,
  0.5/0.5: tie). A folder holds the split as `<split>/*.parquet`, `<split>.parquet` or `<split>-*.parquet`, at any
  depth (the hub repo's own `data/train-00000-of-00645.parquet` matches).
- ImageRewardDB (`THUDM/ImageRewardDB`, https://arxiv.org/abs/2304.05977): `<root>/metadata-<split>.parquet`, one row
  per image: `image_path` (relative to root, e.g. `images/train/train_1/<uuid>.webp`), `prompt_id`, `prompt`, `rank`
  (1 = best, ties allowed). Images ship zipped: `images/<split>/<split>_N.zip` with members `<split>_N/<file>`; we read
  the unzipped file when present, else the zip member (datasets>=4 no longer runs the repo's loading script). A
  metadata parquet may instead carry the image itself in an `image` column (bytes, or a dict with 'bytes').
- Binary labels (Lee et al. 2023, https://arxiv.org/abs/2302.12192): `prompt`, `image` (bytes), `label` (1 good, 0 bad).
- Captioned images (the SFT regulariser's unlabelled data): `caption`, `image` (bytes).
- Prompt sets: see `load_prompts`.

Every preference set comes out as a sequence of `Pair(caption, image_w, image_l)` with the winner first:
    pairs = load_pairs("pickapic", "toy/pickapic", "train")          # or ("imagereward", "toy/imagereward", "train")
    dataset = PairDataset(pairs, resolution=512, random_flip=True, seed=0)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=collate_skip_none)

Images stay encoded until `PairDataset.__getitem__` (Pick-a-Pic v2 is ~1M pairs of JPEGs): `datasets` converts the
parquet once to an Arrow cache under HF_DATASETS_CACHE and memory-maps it.

Bad data is skipped and counted, never guessed at and never silent. Every loader logs ONE summary line per split:
    pickapic train (data/pickapic): 2000 rows read, 1890 kept, 105 ties dropped, 5 broken skipped (3 null label_0, ...)
(INFO when nothing is broken, WARNING otherwise; a script calls `logging.basicConfig(level=logging.INFO)`).
- Labels and ranks are validated, not coerced: a Pick-a-Pic pair must be labelled (1, 0), (0, 1) or (0.5, 0.5); an
  ImageRewardDB rank must be a whole number >= 1 (numbers written as text, "2", are read; "#1" is not a number); a
  binary label 0 or 1. A null, NaN, non-numeric or out-of-range value makes its row broken: never a winner by default.
  A few broken rows are skipped and counted; more than `max_broken` (a fraction of the split's rows; the scripts'
  --max-broken-fraction, default 1 %) stops the run with an error naming the file, the column and the first rows,
  because a label column that is mostly unusable means the layout was misread, not that a few rows are damaged.
- Empty captions / prompts are skipped and counted in the same line, whatever their number; so are an ImageRewardDB
  row with a null prompt_id (no group to rank within) and an image cell holding a path but no bytes. A caption or
  prompt column of bytes is an error naming it.
- Paths read from a data file stay inside the data set: an ImageRewardDB image_path that is absolute, climbs out
  with `..`, or leads out through a symlink is a broken row, skipped and counted, never opened.
- An image that does not decode makes `PairDataset.__getitem__` log a warning and return None, and
  `collate_skip_none` drops it and reports `batch["num_skipped"]` for the script to sum and log.
- A 0-byte or unreadable parquet file and a split with 0 rows are errors naming the file.
- A single parquet file as a source is ONE split: `has_heldout_split` is False for it, and the scripts then skip
  their held-out evaluation (saying so) rather than evaluate on the training rows under a held-out name.
"""

import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import zipfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torchvision.transforms.functional as TF
from PIL import Image

log = logging.getLogger(__name__)

# The default of every loader's `max_broken`: above 1 % of a split's rows with unusable labels, stop (see above).
MAX_BROKEN_FRACTION = 0.01

# The broken-row reason of an image cell that holds a path and no bytes (see _path_only).
PATH_ONLY = "image cell with a path and no bytes"

# An image as stored: encoded bytes, a `datasets` Image dict {'bytes', 'path'}, or a loader returning either.
ImageRef = Union[bytes, dict, Callable[[], Union[bytes, dict]]]


@dataclass(frozen=True)
class Pair:
    caption: str
    image_w: ImageRef  # the preferred image
    image_l: ImageRef
    tie: bool = False  # only with keep_ties=True: neither image is preferred (a reward model may use 0.5 targets)


# ---------------------------------------------------------------- finding and opening parquet files


def _is_hub_id(source: str) -> bool:
    return not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def _parquet_files(source: str, split: str | None) -> list[Path]:
    """The parquet files of `split` under a folder (all of them if split is None), or the file itself."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{source}: no such parquet file or folder")
    patterns = [f"**/{split}/*.parquet", f"**/{split}.parquet", f"**/{split}-*.parquet"] if split else ["**/*.parquet"]
    for pattern in patterns:  # `<split>-*`, not `<split>*`: "validation*" would also match "validation_unique"
        if files := sorted(path.glob(pattern)):
            return files
    raise FileNotFoundError(f"{source}: no parquet files for split '{split}' (looked for {', '.join(patterns)})")


def has_heldout_split(source: str) -> bool:
    """False for a single parquet file: it holds one split, and asking it for a held-out split returns its own rows
    (a held-out accuracy on them would be a training accuracy). A folder or hub id has named splits."""
    return not Path(source).is_file()


def _schema(file: Path) -> list[str]:
    """The column names of a parquet file, read from its footer; a 0-byte or damaged file is named in the error."""
    if file.stat().st_size == 0:
        raise ValueError(f"{file}: empty file (0 bytes), not a parquet file")
    try:
        return pq.read_schema(file).names
    except Exception as e:
        raise ValueError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from e


def _open(source: str, split: str | None, required: list[str], layout: str) -> datasets.Dataset:
    """A hub id, a parquet file or a folder as a memory-mapped Dataset of the `required` columns, images encoded."""
    if _is_hub_id(source):
        try:
            ds = datasets.load_dataset(source, split=split or "train")
        except Exception as e:
            raise RuntimeError(
                f"could not load hub dataset {source!r} (split {split!r}; no local path of that name either): {e}\n"
                f"Any hub id or local path (parquet file or folder) in this layout is accepted: {layout}"
            ) from e
        if missing := [c for c in required if c not in ds.column_names]:
            raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; it has {ds.column_names}")
    else:
        files = _parquet_files(source, split)
        for file in files:  # read only the schema, so a wrong file fails in milliseconds and names itself
            names = _schema(file)
            if missing := [c for c in required if c not in names]:
                raise ValueError(f"{file}: missing column(s) {', '.join(missing)}; it has {names}")
        files = [f for f in files if pq.read_metadata(f).num_rows > 0]  # `datasets` cannot read a 0-row file
        if not files:
            raise ValueError(f"{', '.join(map(str, _parquet_files(source, split)))}: 0 rows for split {split!r}")
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    if len(ds) == 0:
        raise ValueError(f"{source}: 0 rows for split {split!r}")
    ds = ds.select_columns(required)
    for column in required:  # keep images encoded: a column typed `Image` would decode to PIL on every access
        if isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))  # rows then hold {'bytes', 'path'}
    return ds


def _nonempty(texts: list) -> np.ndarray:
    return np.array([isinstance(t, str) and t.strip() != "" for t in texts], dtype=bool)


def _path_only(ds: datasets.Dataset, column: str) -> np.ndarray:
    """Rows whose image cell is a {'bytes', 'path'} struct without bytes. Its path was written into the data file by
    whoever made it and can point anywhere (../../, /etc/passwd): we never follow it, the row is broken."""
    cells = ds.data.column(column)
    if not pa.types.is_struct(cells.type) or cells.type.get_field_index("bytes") < 0:
        return np.zeros(len(cells), dtype=bool)
    return pc.is_null(pc.struct_field(cells, "bytes")).to_numpy(zero_copy_only=False)


def _texts(table: datasets.Dataset | pa.Table, column: str, where: str) -> list:
    """A caption or prompt column as a list. A column of bytes is an error naming it: counted row by row it would
    read as all-empty captions, hiding that the column holds encoded data (an image, or text never decoded)."""
    cells = (table.data if isinstance(table, datasets.Dataset) else table).column(column)
    if pa.types.is_binary(cells.type) or pa.types.is_large_binary(cells.type) or \
            pa.types.is_fixed_size_binary(cells.type):
        raise ValueError(f"{where}: column {column} holds bytes (binary, type {cells.type}), not text; decode it "
                         "to UTF-8 strings, or check that the columns are not swapped")
    return cells.to_pylist()


# ---------------------------------------------------------------- validating labels and ranks, and the summary line


def _numbers(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A label or rank column as (values float64, null, non_numeric). Null and NaN count as null; text that parses as
    a number ("1", "0.5") is read as that number, any other text ("#1", "yes") is non-numeric. Never a guess: the
    caller decides what the unusable rows are (broken), `values` holds NaN there."""
    null = pc.is_null(column).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        values = np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)  # null: NaN
        non_numeric = np.zeros(len(values), dtype=bool)
    else:  # text (a CSV turned parquet) or an all-null column
        values, non_numeric = np.full(len(column), np.nan), ~null
        for i, v in enumerate(column.to_pylist()):
            try:
                values[i], non_numeric[i] = float(v), False
            except (TypeError, ValueError):
                pass
    return values, (null | np.isnan(values)) & ~non_numeric, non_numeric


def _broken_rows(problems: dict[str, np.ndarray], max_broken: float, where: str) -> tuple[np.ndarray, dict[str, int]]:
    """Rows with a label problem (reason -> row mask, in priority order: a row counts under its first reason) and the
    count per reason. More than `max_broken` of the rows broken stops here, naming the reasons and the first rows."""
    n = len(next(iter(problems.values())))
    broken, counts = np.zeros(n, dtype=bool), {}
    for reason, mask in problems.items():
        counts[reason] = int((mask & ~broken).sum())
        broken |= mask
    if broken.sum() > max_broken * n:
        reasons = ", ".join(f"{c} {r}" for r, c in counts.items() if c)
        first = np.flatnonzero(broken)[:5].tolist()
        raise ValueError(
            f"{where}: {int(broken.sum())} of {n} rows have unusable labels ({reasons}); first rows {first}. More "
            f"than --max-broken-fraction {max_broken:g} of the rows: the column is probably misread (wrong layout or "
            f"type), not a few damaged rows. Fix the data, or raise --max-broken-fraction to skip them.")
    return broken, counts


def _summary(what: str, read: int, kept: int, ties: int | None, skipped: dict[str, int], note: str = "") -> None:
    """The loader's one start-up line: rows read, kept, ties dropped, broken skipped (with reasons). WARNING when
    anything was skipped, so a silent change of the data shows in every run's log."""
    n_skipped = sum(skipped.values())
    reasons = ", ".join(f"{c} {r}" for r, c in skipped.items() if c)
    line = f"{what}: {read} rows read, {kept} kept" + (f", {ties} ties dropped" if ties is not None else "")
    line += f", {n_skipped} broken skipped" + (f" ({reasons})" if reasons else "") + note
    (log.warning if n_skipped else log.info)(line)


# ---------------------------------------------------------------- preference pairs


class PickapicPairs(Sequence):
    """A lazy view of Pick-a-Pic rows as winner-first Pairs: only the kept row numbers live in memory."""

    def __init__(self, ds: datasets.Dataset, rows: np.ndarray, swap: np.ndarray, tie: np.ndarray):
        self.ds, self.rows, self.swap, self.tie = ds, rows, swap, tie

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Pair:
        row = self.ds[int(self.rows[i])]  # IndexError past the end ends iteration
        image_0, image_1 = row["jpg_0"], row["jpg_1"]
        if self.swap[i]:
            image_0, image_1 = image_1, image_0
        return Pair(row["caption"], image_0, image_1, tie=bool(self.tie[i]))


def load_pickapic(
    source: str, split: str = "train", keep_ties: bool = False, max_pairs: int | None = None,
    max_broken: float = MAX_BROKEN_FRACTION,
) -> PickapicPairs:
    """Pick-a-Pic pairs, winner first; ties (0.5/0.5) dropped unless keep_ties. Rows whose labels are not (1, 0),
    (0, 1) or (0.5, 0.5), and rows with an empty caption, are skipped and counted (see the module docstring)."""
    layout = "columns caption, jpg_0, jpg_1 (image bytes), label_0, label_1; <split>/*.parquet or <split>-*.parquet"
    layout += " (the original yuvalkirstain/pickapic_v2 has answered 404 since 2025: point to a copy)"
    ds = _open(source, split, ["caption", "jpg_0", "jpg_1", "label_0", "label_1"], layout)
    label_0, null_0, text_0 = _numbers(ds.data.column("label_0"))
    label_1, null_1, text_1 = _numbers(ds.data.column("label_1"))
    valid = (((label_0 == 1) & (label_1 == 0)) | ((label_0 == 0) & (label_1 == 1))
             | ((label_0 == 0.5) & (label_1 == 0.5)))
    broken, skipped = _broken_rows({
        "null label_0": null_0, "null label_1": null_1, "non-numeric label_0": text_0, "non-numeric label_1": text_1,
        "label pair not (1, 0), (0, 1) or (0.5, 0.5)": ~valid,
    }, max_broken, f"{source} (split {split}), label_0/label_1")
    tie = valid & (label_0 == 0.5)
    has_caption = _nonempty(_texts(ds, "caption", f"{source} (split {split})"))
    no_bytes = _path_only(ds, "jpg_0") | _path_only(ds, "jpg_1")
    skipped[PATH_ONLY] = int((no_bytes & ~broken).sum())
    skipped["empty caption"] = int((~has_caption & ~broken & ~no_bytes).sum())
    usable = ~broken & ~no_bytes & has_caption
    # The official Diffusion-DPO code keeps only label_0 in (0, 1) and swaps when label_0 == 0, printing
    # "Eliminated {n}/{N} split decisions for Pick-a-pic".
    keep = usable & (keep_ties | ~tie)
    rows = np.flatnonzero(keep)[:max_pairs]
    n_ties = None if keep_ties else int((tie & usable).sum())
    note = f"; the first {len(rows)} used (max_pairs)" if len(rows) < keep.sum() else ""
    _summary(f"pickapic {split} ({source})", len(ds), int(keep.sum()), n_ties, skipped, note)
    return PickapicPairs(ds.select_columns(["caption", "jpg_0", "jpg_1"]), rows, (label_0 < label_1)[rows], tie[rows])


@functools.lru_cache(maxsize=None)
def _zip(path: str, pid: int) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)  # one handle per process: a forked DataLoader worker must not share its file offset


@functools.lru_cache(maxsize=None)
def _data_set_folder(root: str) -> str:
    """The folder that every path read from `root`'s data files must resolve into: `root` itself (symlinks
    resolved, so the data set's own folder may be a link), or, for a Hugging Face cache snapshot
    (<repo>/snapshots/<revision>, whose files are symlinks into <repo>/blobs), the repo's cache folder."""
    folder = Path(os.path.realpath(root))
    return os.path.join(folder.parent.parent if folder.parent.name == "snapshots" else folder, "")


def _outside_data_set(root: str, image_path: str) -> bool:
    """An ImageRewardDB `image_path` that leaves its data set: absolute, `..` out of `root`, or a symlink (of the
    file, its zip, or a folder on the way) to somewhere else. Both places the image may be read from are checked,
    the unzipped file and its zip; the zip member's name is built from the path's last two parts, so it cannot
    leave the zip. A data file must never make us open /etc/passwd."""
    file = Path(root) / image_path
    archive = file.parent.parent / f"{file.parent.name}.zip"
    inside = _data_set_folder(root)
    return os.path.isabs(image_path) or not all(os.path.realpath(p).startswith(inside) for p in (file, archive))


def read_imagereward_image(root: str, image_path: str) -> bytes:
    """The bytes of `root/image_path` if unzipped, else of member `<split>_N/<file>` of images/<split>/<split>_N.zip.
    A path that leaves `root` is refused unopened (load_imagereward has already skipped and counted such rows)."""
    if _outside_data_set(root, image_path):
        raise ValueError(f"image_path {image_path!r} leads outside the data set {root}: not opened")
    file = Path(root) / image_path
    if file.is_file():
        return file.read_bytes()
    archive = file.parent.parent / f"{file.parent.name}.zip"  # images/train/train_1/x.webp -> images/train/train_1.zip
    if not archive.is_file():
        raise FileNotFoundError(f"{image_path}: neither {file} nor {archive} exists")
    return _zip(str(archive), os.getpid()).read(f"{file.parent.name}/{file.name}")


def _dataset_cell(ds: datasets.Dataset, column: str, row: int) -> bytes | dict:
    return ds[row][column]


def load_imagereward(source: str, split: str, max_broken: float = MAX_BROKEN_FRACTION) -> list[dict]:
    """ImageRewardDB rows, one per image: {prompt_id, prompt, rank, image}; `image` is a loader (an ImageRef).
    A row whose rank is null, non-numeric, or not a whole number >= 1, or whose prompt is empty, is skipped and
    counted (see the module docstring); `rank` comes out as an int."""
    rows, read, skipped = _imagereward_rows(source, split, max_broken)
    _summary(f"imagereward {split} ({source})", read, len(rows), None, skipped)
    return rows


def _imagereward_rows(source: str, split: str, max_broken: float) -> tuple[list[dict], int, dict[str, int]]:
    """load_imagereward's rows, the number read and the skipped counts by reason, without the summary line."""
    path = Path(source)
    if _is_hub_id(source):
        patterns = [f"metadata-{split}.parquet", f"images/{split}/*"]
        try:
            path = Path(huggingface_hub.snapshot_download(source, repo_type="dataset", allow_patterns=patterns))
        except Exception as e:
            raise RuntimeError(
                f"could not download {patterns} of hub dataset {source!r}: {e}\nAny hub id or local folder in the "
                f"ImageRewardDB layout (metadata-<split>.parquet, images/<split>/<split>_N.zip) is accepted."
            ) from e
    meta = path if path.is_file() else path / f"metadata-{split}.parquet"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: an ImageRewardDB folder holds metadata-{split}.parquet")
    image_column = "image" if "image" in _schema(meta) else "image_path"
    ds = _open(str(meta), None, ["prompt_id", "prompt", "rank", image_column], layout="")
    if image_column == "image":  # images inside the parquet: read a row's cell when asked
        loaders = [functools.partial(_dataset_cell, ds.select_columns(["image"]), "image", i) for i in range(len(ds))]
    else:
        paths = ds["image_path"]
        loaders = [functools.partial(read_imagereward_image, str(meta.parent), p) for p in paths]
    rank, null, text = _numbers(ds.data.column("rank"))
    whole = ~np.isnan(rank) & (rank >= 1) & (np.mod(rank, 1) == 0)  # ImageRewardDB ranks are 1 (best), 2, ...
    broken, skipped = _broken_rows(
        {"null rank": null, "non-numeric rank": text, "rank not a whole number >= 1": ~whole},
        max_broken, f"{meta}, column rank")
    table = ds.select_columns(["prompt_id", "prompt"]).to_dict()
    # Rows that cannot be used whatever their rank, each counted under its first reason: no group to rank within
    # (a null prompt_id would pool every such row into one prompt), an image path that leaves the data set, no
    # prompt. Never fatal, as empty captions are not.
    problems = {"null prompt_id": pc.is_null(ds.data.column("prompt_id"), nan_is_null=True).to_numpy(
        zero_copy_only=False)}
    if image_column == "image":
        problems[PATH_ONLY] = _path_only(ds, "image")
    else:
        problems["null image_path"] = np.array([not isinstance(p, str) or p == "" for p in paths], dtype=bool)
        problems["image_path outside the data set"] = np.array(
            [isinstance(p, str) and p != "" and _outside_data_set(str(meta.parent), p) for p in paths], dtype=bool)
    problems["empty prompt"] = ~_nonempty(_texts(ds, "prompt", str(meta)))
    keep = ~broken
    for reason, mask in problems.items():
        skipped[reason] = int((mask & keep).sum())
        keep &= ~mask
    rows = [
        dict(prompt_id=pid, prompt=prompt, rank=int(r), image=loader)
        for pid, prompt, r, loader, ok in zip(table["prompt_id"], table["prompt"], rank, loaders, keep)
        if ok
    ]
    return rows, len(ds), skipped


def imagereward_pairs(rows: list[dict], keep_ties: bool = False) -> list[Pair]:
    """Every i < j within a prompt_id with different ranks, the lower rank (better) first; equal ranks skipped."""
    by_prompt = defaultdict(list)  # insertion-ordered, so the pair order is deterministic
    for row in rows:
        by_prompt[row["prompt_id"]].append(row)
    pairs = []
    for group in by_prompt.values():
        for a, b in itertools.combinations(group, 2):
            tie = a["rank"] == b["rank"]
            if tie and not keep_ties:
                continue
            w, l = (a, b) if a["rank"] <= b["rank"] else (b, a)
            pairs.append(Pair(a["prompt"], w["image"], l["image"], tie=tie))
    return pairs


def load_pairs(
    dataset: Literal["pickapic", "imagereward"],
    source: str,
    split: str,
    keep_ties: bool = False,
    max_pairs: int | None = None,
    max_broken: float = MAX_BROKEN_FRACTION,
) -> Sequence[Pair]:
    """Winner-first preference pairs from either dataset, so a script picks its data with one flag. One summary line
    per call; for ImageRewardDB it counts images (rows) and then the pairs made of them."""
    if dataset == "pickapic":
        return load_pickapic(source, split, keep_ties=keep_ties, max_pairs=max_pairs, max_broken=max_broken)
    if dataset == "imagereward":
        rows, read, skipped = _imagereward_rows(source, split, max_broken)
        every = imagereward_pairs(rows, keep_ties=True)
        pairs = [p for p in every if keep_ties or not p.tie]
        note = f" -> {len(pairs)} pairs" + ("" if keep_ties else f", {len(every) - len(pairs)} tied pairs dropped")
        note += f"; the first {max_pairs} used (max_pairs)" if max_pairs is not None and max_pairs < len(pairs) else ""
        _summary(f"imagereward {split} ({source}) images", read, len(rows), None, skipped, note)
        return pairs[:max_pairs]
    raise ValueError(f"unknown preference dataset {dataset!r}; expected 'pickapic' or 'imagereward'")


def data_files(dataset: str, source: str, split: str) -> list[str]:
    """What a split is read from, for a cache key (common.runtime.fingerprint hashes it): the split's parquet files;
    for ImageRewardDB its metadata file and the images/ folder beside it; a hub id as itself."""
    if _is_hub_id(source):
        return [source]
    if dataset == "imagereward":
        path = Path(source)
        meta = path if path.is_file() else path / f"metadata-{split}.parquet"
        return [str(meta)] + ([str(meta.parent / "images")] if (meta.parent / "images").is_dir() else [])
    return [str(f) for f in _parquet_files(source, split)]


def pair_selection(pairs: Sequence[Pair]) -> str:
    """A digest of which rows became which pairs, winner first (for a cache key next to the data's bytes): the kept
    rows and swaps of Pick-a-Pic, the index and swaps of relabelled pairs, else the number of pairs."""
    h = hashlib.sha256(str(len(pairs)).encode())
    if isinstance(pairs, PickapicPairs):
        for a in (pairs.rows, pairs.swap, pairs.tie):
            h.update(np.ascontiguousarray(a).tobytes())
    if isinstance(pairs, RelabelledPairs):
        h.update(np.ascontiguousarray(pairs.index).tobytes() + np.ascontiguousarray(pairs.swap).tobytes())
        h.update(pair_selection(pairs.pairs).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- images and the training Dataset


def image_bytes(image: ImageRef) -> bytes:
    if callable(image):
        return image_bytes(image())
    if isinstance(image, dict):  # a path in a data file is never followed (the loaders skip such rows)
        if image.get("bytes") is None:
            raise ValueError(f"the image cell holds no bytes, only the path {image.get('path')!r}: not opened")
        return image["bytes"]
    return bytes(image)


def decode_image(image: ImageRef) -> Image.Image:
    """Decode bytes / {'bytes': ...} / a loader to a PIL image, fully, so a truncated file fails here."""
    if isinstance(image, Image.Image):
        return image
    decoded = Image.open(io.BytesIO(image_bytes(image)))
    decoded.load()
    return decoded


def preprocess(image: Image.Image, resolution: int, flip: bool) -> torch.Tensor:
    """RGB, shorter side resized to R (bilinear, antialiased), centre crop R x R, optional flip -> (3, R, R) in [-1, 1].

    The official Diffusion-DPO train transform: Resize(R, BILINEAR), CenterCrop(R), RandomHorizontalFlip,
    ToTensor, Normalize([0.5], [0.5]); here the flip is decided by `flip_decision` rather than drawn at random.
    """
    image = TF.resize(image.convert("RGB"), resolution, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    image = TF.center_crop(image, [resolution, resolution])
    if flip:
        image = TF.hflip(image)
    return TF.to_tensor(image) * 2.0 - 1.0  # (3, R, R)


def flip_decision(seed: int, index: int, which: str) -> bool:
    """Whether to flip image `which` ("w" or "l") of pair `index`: a hash, so a resumed run, every DataLoader
    worker and a latent cache all see the same flips without sharing RNG state."""
    return hashlib.blake2b(f"{seed}/{index}/{which}".encode(), digest_size=1).digest()[0] & 1 == 1


class PairDataset(torch.utils.data.Dataset):
    """Pairs as training tensors. Each image gets its own flip, as the official code transforms each separately."""

    def __init__(self, pairs: Sequence[Pair], resolution: int, random_flip: bool, seed: int):
        self.pairs, self.resolution, self.random_flip, self.seed = pairs, resolution, random_flip, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict | None:
        pair = self.pairs[index]
        try:
            image_w, image_l = decode_image(pair.image_w), decode_image(pair.image_l)
        except Exception as e:  # any data error (bad bytes, missing zip member) skips the pair; collate counts it
            log.warning("pair %d: undecodable image, skipped (%s: %s)", index, type(e).__name__, e)
            return None
        flip_w = self.random_flip and flip_decision(self.seed, index, "w")
        flip_l = self.random_flip and flip_decision(self.seed, index, "l")
        return dict(
            pixel_w=preprocess(image_w, self.resolution, flip_w),  # (3, R, R)
            pixel_l=preprocess(image_l, self.resolution, flip_l),  # (3, R, R)
            caption=pair.caption,
            index=index,
        )


def collate_skip_none(batch: list[dict | None]) -> dict | None:
    """Stack PairDataset items, dropping the None of broken pairs; None if all were broken (skip the step).

    `num_skipped` travels with the batch because collate runs inside the DataLoader worker: a counter kept on the
    dataset would only change in the worker's copy. Sum it in the training loop and log it.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return dict(
        pixel_w=torch.stack([item["pixel_w"] for item in kept]),  # (B, 3, R, R)
        pixel_l=torch.stack([item["pixel_l"] for item in kept]),  # (B, 3, R, R)
        caption=[item["caption"] for item in kept],
        index=torch.tensor([item["index"] for item in kept]),
        num_skipped=len(batch) - len(kept),
    )


# ---------------------------------------------------------------- single images and prompt sets


def _drop_empty(ds: datasets.Dataset, column: str, what: str) -> datasets.Dataset:
    keep = _nonempty(_texts(ds, column, what))
    if not keep.all():
        n = int((~keep).sum())
        log.warning("%s: skipped %d of %d rows: %d empty %ss", what, n, len(ds), n, column)
        ds = ds.select(np.flatnonzero(keep))
    return ds


def load_captioned_images(source: str) -> datasets.Dataset:
    """Rows {caption, image (bytes)} from a parquet file, every parquet file under a folder, or a hub id."""
    ds = _open(source, None, ["caption", "image"], layout="columns caption, image (bytes)")
    return _drop_empty(ds, "caption", source)


def load_binary(source: str, split: str, max_broken: float = MAX_BROKEN_FRACTION) -> datasets.Dataset:
    """Rows {prompt, image (bytes), label (1 good, 0 bad)} of `split`, e.g. `<source>/<split>.parquet`. A row whose
    label is null, non-numeric or not 0/1, or whose prompt is empty, is skipped and counted (module docstring)."""
    ds = _open(source, split, ["prompt", "image", "label"], layout="columns prompt, image (bytes), label (1/0)")
    label, null, text = _numbers(ds.data.column("label"))
    broken, skipped = _broken_rows({"null label": null, "non-numeric label": text,
                                    "label not 0 or 1": (label != 0) & (label != 1)},
                                   max_broken, f"{source} (split {split}), column label")
    has_prompt = _nonempty(_texts(ds, "prompt", f"{source} (split {split})"))
    no_bytes = _path_only(ds, "image")
    skipped[PATH_ONLY] = int((no_bytes & ~broken).sum())
    skipped["empty prompt"] = int((~has_prompt & ~broken & ~no_bytes).sum())
    keep = np.flatnonzero(~broken & ~no_bytes & has_prompt)
    _summary(f"binary {split} ({source})", len(ds), len(keep), None, skipped)
    if len(keep) < len(ds):
        ds = ds.select(keep)
    if ds.features["label"].dtype in ("string", "large_string", "null"):  # labels written as text: "1" -> 1
        ds = ds.remove_columns(["label"]).add_column("label", label[keep].astype(np.int64).tolist())
    return ds


HPSV2_STYLES = ["anime", "concept-art", "paintings", "photo"]  # the HPSv2 benchmark: 800 prompts each


def _hub_prompts(name: str, repo: str, split: str, column: str) -> list[str]:
    try:
        return list(datasets.load_dataset(repo, split=split).select_columns([column]).to_dict()[column])
    except Exception as e:
        raise RuntimeError(
            f"could not load prompt set {name!r} from hub dataset {repo} ({split}, column {column}): {e}\n"
            "Pass a local text file (one prompt per line) or a parquet file with a caption/prompt column instead."
        ) from e


def _utf8(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 is an error naming it and the first bad byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                         "save it as UTF-8") from e


def load_prompts(source: str) -> list[str]:
    """A prompt set: a text file (one per line), a .json list, a parquet file (`caption` or `prompt` column,
    duplicates removed, since Pick-a-Pic repeats a caption per pair), an HPSv2 folder (anime/concept-art/paintings/
    photo.json, 3,200 prompts), "partiprompts" (nateraw/parti-prompts, 1,632) or "pickapic" (validation_unique, 500)."""
    path = Path(source)
    if path.is_dir():
        missing = [f"{s}.json" for s in HPSV2_STYLES if not (path / f"{s}.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{source}: not an HPSv2 prompt folder, missing {', '.join(missing)}")
        prompts = [p for s in HPSV2_STYLES for p in json.loads(_utf8(path / f"{s}.json"))]
    elif path.suffix == ".parquet" and path.is_file():
        names = _schema(path)
        column = "caption" if "caption" in names else "prompt"
        if column not in names:
            raise ValueError(f"{path}: missing column caption or prompt; it has {names}")
        prompts = list(dict.fromkeys(_texts(pq.read_table(path, columns=[column]), column, str(path))))
    elif path.suffix == ".json" and path.is_file():
        prompts = json.loads(_utf8(path))
    elif path.is_file():
        prompts = _utf8(path).splitlines()
    elif source == "partiprompts":
        prompts = _hub_prompts(source, "nateraw/parti-prompts", "train", "Prompt")
    elif source == "pickapic":
        prompts = _hub_prompts(source, "yuvalkirstain/pickapic_v2", "validation_unique", "caption")
    else:
        raise FileNotFoundError(
            f"prompt source {source!r}: no such file or folder, and not 'partiprompts' or 'pickapic'. For 'hpsv2' (no "
            f"reliable hub copy) pass a folder of {', '.join(f'{s}.json' for s in HPSV2_STYLES)}, each a JSON list."
        )
    return [p.strip() for p in prompts if isinstance(p, str) and p.strip()]


# ---------------------------------------------------------------- the training order, per-epoch flips, latent cache
# Shared by diffusion_dpo.py and sft.py. The order is a function of the micro-step alone, so --resume needs no sampler
# state and N GPUs see exactly what one process with the same global batch sees.


def flip_seed(seed: int, epoch: int) -> int:
    """The flip_decision seed of an epoch: flips are redrawn every epoch, as the official RandomHorizontalFlip is."""
    return 10_000 * seed + epoch


def micro_batches(n: int, per_device: int, rank: int, world_size: int, seed: int, start: int):
    """This rank's [(epoch, index), ...] for every micro-step from `start` on. Epoch e visits the n items in the order
    randperm(n, seed + e), cut into global micro-batches of per_device × world_size (the rest of an epoch is dropped);
    rank r takes the r-th slice."""
    size = per_device * world_size
    per_epoch, epoch = n // size, None
    for k in itertools.count(start):
        if k // per_epoch != epoch:
            epoch = k // per_epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        first = (k % per_epoch) * size + rank * per_device
        yield [(epoch, i) for i in order[first:first + per_device]]


class EpochPairs(torch.utils.data.Dataset):
    """PairDataset items keyed by (epoch, index), with that epoch's flips. A pair whose image does not decode is
    replaced by the next good one, so every rank's micro-batch stays full (an empty one would hang DDP)."""

    def __init__(self, pairs: Sequence[Pair], resolution: int, random_flip: bool, seed: int):
        self.pairs, self.resolution, self.random_flip, self.seed = pairs, resolution, random_flip, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        data = PairDataset(self.pairs, self.resolution, self.random_flip, flip_seed(self.seed, epoch))
        for skipped in range(len(self.pairs)):
            if (item := data[(index + skipped) % len(self.pairs)]) is not None:
                return {**item, "skipped": skipped}
        raise RuntimeError("no pair in the data set decodes")


def collate_pairs(items: list[dict]) -> dict:
    """collate_skip_none for EpochPairs items; num_skipped counts the broken pairs replaced by the next good one."""
    batch = collate_skip_none(items)
    batch["num_skipped"] = sum(item["skipped"] for item in items)
    return batch


def build_latent_cache(pairs: Sequence[Pair], vae, resolution: int, random_flip: bool, key: list, root: Path, dist,
                       per_device_batch: int, num_workers: int) -> torch.Tensor:
    """VAE posterior parameters (mean, log-variance) of every pair's two images, as is and flipped, encoded once:
    (N, 2 [winner, loser], F [as is, flipped], 2C, h, w) in a file-backed tensor, NaN rows for pairs that do not
    decode. We keep the distribution, not a latent, because the official code draws latent_dist.sample() afresh at
    every visit; both flips because the flip is redrawn every epoch. Pick-a-Pic v2 at 512 px in fp16:
    851k × 2 × 2 × 8 × 64 × 64 × 2 B ≈ 220 GB (at 1024 px, SDXL: 4x that), so point the cache at a big local disk.
    Each rank encodes every world_size-th pair into the shared file; a later run with the same `key` (a JSON-able
    list of what determines the latents: the VAE's and the pairs' bytes, see diffusion_dpo.py) reuses it, after
    comparing the key stored beside it. `dist` is common.runtime.Dist."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from common.runtime import barrier

    flips = 2 if random_flip else 1
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(pairs), 2, flips, 2 * vae.config.latent_channels, side, side)
    key = json.dumps([*key, resolution, flips, str(vae.dtype)])
    path = Path(root) / f"latents-{hashlib.sha1(key.encode()).hexdigest()[:12]}.bin"
    stored = path.with_suffix(".json")  # written last: the cache is complete, and this is its key
    if not (stored.exists() and stored.read_text() == key):
        if dist.is_main:
            stored.unlink(missing_ok=True)  # a stale key (a 12-hex-digit name collision): rebuilt, marked last
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(int(np.prod(shape)) * vae.dtype.itemsize)
        barrier()
        cache = torch.from_file(str(path), shared=True, size=int(np.prod(shape)), dtype=vae.dtype).view(shape)
        mine = list(range(dist.rank, len(pairs), dist.world_size))
        chunks = [mine[k:k + per_device_batch] for k in range(0, len(mine), per_device_batch)]
        loader = DataLoader(PairDataset(pairs, resolution, random_flip=False, seed=0), batch_sampler=chunks,
                            collate_fn=collate_skip_none, num_workers=num_workers)
        for wanted, batch in zip(chunks, tqdm(loader, desc="caching latents", disable=not dist.is_main)):
            cache[wanted] = float("nan")  # overwritten below for every pair that decodes
            if batch is None:
                continue
            x = torch.stack([batch["pixel_w"], batch["pixel_l"]], 1)  # (b, 2, 3, R, R)
            x = torch.stack([x, x.flip(-1)][:flips], 2)  # (b, 2, F, 3, R, R); flipping pixels = flipping the image
            with torch.no_grad():
                moments = vae.encode(x.flatten(0, 2).to(vae.device, vae.dtype)).latent_dist.parameters
            cache[batch["index"]] = moments.view(*x.shape[:3], *moments.shape[1:]).cpu()
        barrier()
        if dist.is_main:
            path.with_suffix(".json").write_text(key)  # marks the cache complete
    return torch.from_file(str(path), shared=False, size=int(np.prod(shape)), dtype=vae.dtype).view(shape)


def cached_batch(cache: torch.Tensor, valid: torch.Tensor, pairs: Sequence[Pair], keys: list, random_flip: bool,
                 seed: int):
    """What a training micro-step needs from the latent cache: moments (2B, 2C, h, w) winners first, captions, and
    how many broken pairs were replaced by the next good one (the same rule as EpochPairs)."""
    index, flip_w, flip_l, skipped = [], [], [], 0
    for epoch, i in keys:
        while not valid[i]:
            i, skipped = (i + 1) % len(valid), skipped + 1
        index.append(i)
        flip_w.append(int(random_flip and flip_decision(flip_seed(seed, epoch), i, "w")))
        flip_l.append(int(random_flip and flip_decision(flip_seed(seed, epoch), i, "l")))
    moments = torch.cat([cache[index, 0, flip_w], cache[index, 1, flip_l]])  # (2B, 2C, h, w)
    return moments, [pairs[i].caption for i in index], skipped


# ---------------------------------------------------------------- AI feedback: pairs relabelled by a scorer


class RelabelledPairs(Sequence):
    """`pairs` with the winner chosen by a scorer: pair k is pairs[index[k]], its images swapped where swap[k]."""

    def __init__(self, pairs: Sequence[Pair], index: np.ndarray, swap: np.ndarray):
        self.pairs, self.index, self.swap = pairs, index, swap

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Pair:
        if not 0 <= k < len(self.index):
            raise IndexError(k)
        pair = self.pairs[int(self.index[k])]
        return Pair(pair.caption, pair.image_l, pair.image_w) if self.swap[k] else pair


class DecodedPairImages(torch.utils.data.Dataset):
    """Both images of every pair as decoded, uint8 (3, H, W) each, no resize or crop: what the official AI-feedback
    choice models see (the PIL images of jpg_0 and jpg_1); None for a pair that does not decode."""

    def __init__(self, pairs: Sequence[Pair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict | None:
        pair = self.pairs[index]
        try:
            images = [decode_image(pair.image_w).convert("RGB"), decode_image(pair.image_l).convert("RGB")]
        except Exception as e:  # scored NaN, then dropped by relabel_pairs
            log.warning("pair %d: undecodable image, not scored (%s: %s)", index, type(e).__name__, e)
            return None
        w, l = (torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1) for im in images)  # (3, H, W)
        return dict(image_w=w, image_l=l, caption=pair.caption, index=index)


def _score_decoded(scorer, items: list[dict], device) -> torch.Tensor:
    """(b, 2) scores of DecodedPairImages items [winner, loser]: images of one size scored together, each in [0, 1]."""
    scores = torch.empty(len(items), 2)
    by_size: dict[tuple, list[tuple[int, int]]] = {}
    for i, item in enumerate(items):
        for j, name in enumerate(("image_w", "image_l")):
            by_size.setdefault(tuple(item[name].shape), []).append((i, j))
    for where in by_size.values():
        images = torch.stack([items[i][("image_w", "image_l")[j]] for i, j in where]).to(device).float() / 255
        with torch.no_grad():
            s = scorer(images, [items[i]["caption"] for i, _ in where]).float().cpu()
        for (i, j), v in zip(where, s):
            scores[i, j] = v
    return scores


def score_pairs(pairs: Sequence[Pair], scorer, resolution: int | None, path: Path, dist, batch_size: int = 32,
                device: str | torch.device = "cpu", key: str = "") -> torch.Tensor:
    """The scorer's s(x, c) of both images of every pair, (N, 2) float32 [human winner, human loser], computed once
    into `path` (safetensors) and read back by later runs. Under torchrun each rank scores every world_size-th pair
    into its own shard file; every rank then reads all shards. NaN for a pair whose images do not decode. Images in
    [0, 1]: resolution None, as decoded (the official AI feedback scores the PIL images of jpg_0 / jpg_1; images of
    one size are batched together); else the training crop (shorter side resized to `resolution`, centre crop, no
    flip). `key` (what the scores depend on: the scorer's weights, the data's bytes) is stored in the file and
    compared on reuse: a file of another key is scored afresh."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from common.runtime import barrier

    path = Path(path)
    shard = path.with_name(f"{path.stem}.rank{dist.rank}of{dist.world_size}.safetensors")

    def stored_key() -> str | None:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("key")

    if not (path.exists() and stored_key() == key):
        barrier()  # every rank has read the old file's key before rank 0 replaces it
        mine = list(range(dist.rank, len(pairs), dist.world_size))
        chunks = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
        scores = torch.full((len(mine), 2), float("nan"))
        if resolution is None:
            loader = DataLoader(DecodedPairImages(pairs), batch_sampler=chunks,
                                collate_fn=lambda items: [item for item in items if item is not None])
        else:
            loader = DataLoader(PairDataset(pairs, resolution, random_flip=False, seed=0), batch_sampler=chunks,
                                collate_fn=collate_skip_none)
        for batch in tqdm(filter(None, loader), total=len(chunks), desc="relabelling", disable=not dist.is_main):
            if resolution is None:
                s, index = _score_decoded(scorer, batch, device), torch.tensor([item["index"] for item in batch])
            else:
                images = torch.cat([batch["pixel_w"], batch["pixel_l"]]).to(device) * 0.5 + 0.5  # (2b, 3, R, R)
                with torch.no_grad():
                    s = scorer(images, batch["caption"] * 2).float().cpu().view(2, -1).T  # (b, 2)
                index = batch["index"]
            scores[index // dist.world_size] = s  # pair i is this rank's (i - rank) / world_size-th
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"scores": scores.contiguous()}, str(shard))
        barrier()
        if dist.is_main:
            full = torch.full((len(pairs), 2), float("nan"))
            for r in range(dist.world_size):
                full[r::dist.world_size] = load_file(str(path.with_name(
                    f"{path.stem}.rank{r}of{dist.world_size}.safetensors")))["scores"]
            save_file({"scores": full}, str(path.with_suffix(".tmp")), metadata={"key": key})
            os.replace(path.with_suffix(".tmp"), path)  # complete or absent
        barrier()
    return load_file(str(path))["scores"]


def relabel_pairs(pairs: Sequence[Pair], scores: torch.Tensor) -> tuple[RelabelledPairs, dict]:
    """AI feedback (Diffusion-DPO paper Sec. 5.4; official --choice_model): the image the scorer rates higher wins,
    on the raw scores (no per-prompt or per-set normalisation: only the sign of s_0 - s_1 matters, as in the official
    code). scores (N, 2) [human winner, human loser] from score_pairs. A tie in the scorer's view (equal scores) is
    kept with the data row's first image (Pick-a-Pic's jpg_0) as the winner, as the official code, which hands the
    pair over in column order and swaps it only when s(jpg_1) > s(jpg_0); for other pair sources (no column order
    known) the loader's order stands. Pairs that did not decode (NaN) are dropped (the official loader would stop).
    Returns the pairs and counts: kept, flipped (pairs whose winner changed against the human label, ties included),
    agreement (the fraction of the kept non-tie pairs where the scorer picks the human winner), ties (kept),
    undecodable (dropped)."""
    s_w, s_l = scores[:, 0].numpy(), scores[:, 1].numpy()
    index = np.flatnonzero(np.isfinite(s_w) & np.isfinite(s_l))
    tie = s_w[index] == s_l[index]
    # PickapicPairs.swap: the human preferred jpg_1, so jpg_0 is the pair's second image; a tie goes to jpg_0
    first_lost = np.asarray(pairs.swap)[index] if isinstance(pairs, PickapicPairs) else np.zeros(len(index), bool)
    swap = np.where(tie, first_lost, s_l[index] > s_w[index])
    decided = swap[~tie]
    stats = {"kept": len(index), "flipped": int(swap.sum()),
             "agreement": float(1 - decided.mean()) if len(decided) else float("nan"), "ties": int(tie.sum()),
             "undecodable": int(len(scores) - len(index))}
    return RelabelledPairs(pairs, index, swap), stats
