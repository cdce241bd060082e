"""common/data.py on tiny synthetic datasets written in tmp_path, in the layouts the loaders document."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets / huggingface_hub read it at import

import io
import itertools
import json
import logging
import time
import zipfile

import datasets
import numpy as np
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from common.data import (
    PairDataset,
    collate_skip_none,
    decode_image,
    flip_decision,
    imagereward_pairs,
    load_binary,
    load_captioned_images,
    load_imagereward,
    load_pairs,
    load_pickapic,
    load_prompts,
    preprocess,
    read_imagereward_image,
)

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def png(color, size=(8, 8)) -> bytes:
    """`color` on the left half, white on the right: asymmetric, so a flip shows."""
    image = Image.new("RGB", size, WHITE)
    image.paste(color, (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def color_of(image_bytes) -> tuple:
    return decode_image(image_bytes).convert("RGB").getpixel((0, 0))


def write_pickapic(path, rows):
    """rows: (caption, jpg_0, jpg_1, label_0); plus the real set's extra columns, which the loader ignores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "caption": [r[0] for r in rows],
        "jpg_0": [r[1] for r in rows],
        "jpg_1": [r[2] for r in rows],
        "label_0": [float(r[3]) for r in rows],
        "label_1": [1.0 - r[3] for r in rows],
        "image_0_uid": [f"{i}a" for i in range(len(rows))],
        "image_1_uid": [f"{i}b" for i in range(len(rows))],
        "best_image_uid": ["" for _ in rows],
        "ranking_id": list(range(len(rows))),
    }
    pq.write_table(pa.table(table), path)


@pytest.fixture
def pickapic(tmp_path):
    root = tmp_path / "pickapic"
    write_pickapic(root / "train" / "part-0.parquet", [
        ("red wins", png(RED), png(BLUE), 1.0),
        ("blue wins", png(RED), png(BLUE), 0.0),  # label_0 = 0: image 1 preferred, so the images swap
        ("a tie", png(RED), png(BLUE), 0.5),
        ("", png(RED), png(BLUE), 1.0),  # empty caption
        ("broken", b"not an image", png(BLUE), 1.0),
    ])
    write_pickapic(root / "validation" / "part-0.parquet", [("val", png(GREEN), png(RED), 1.0)])
    return root


def test_pickapic_winner_first_and_empty_caption_dropped(pickapic, caplog):
    with caplog.at_level(logging.INFO):
        pairs = load_pickapic(str(pickapic), "train")
    assert [p.caption for p in pairs] == ["red wins", "blue wins", "broken"]
    assert color_of(pairs[0].image_w) == RED and color_of(pairs[0].image_l) == BLUE
    assert color_of(pairs[1].image_w) == BLUE and color_of(pairs[1].image_l) == RED
    assert "pickapic train (" in caplog.text
    assert "): 5 rows read, 3 kept, 1 ties dropped, 1 broken skipped (1 empty caption)\n" in caplog.text
    assert [p.caption for p in load_pickapic(str(pickapic), "validation")] == ["val"]


def test_pickapic_ties_kept_and_max_pairs(pickapic):
    pairs = load_pickapic(str(pickapic), "train", keep_ties=True)
    assert [p.caption for p in pairs] == ["red wins", "blue wins", "a tie", "broken"]
    assert [p.tie for p in pairs] == [False, False, True, False]
    assert [p.caption for p in load_pickapic(str(pickapic), "train", max_pairs=2)] == ["red wins", "blue wins"]
    single_file = load_pickapic(str(pickapic / "train" / "part-0.parquet"))
    assert len(single_file) == 3


def test_pickapic_hub_style_folder_does_not_confuse_splits(tmp_path):
    write_pickapic(tmp_path / "data" / "validation-00000-of-00001.parquet", [("v", png(RED), png(BLUE), 1.0)])
    write_pickapic(tmp_path / "data" / "validation_unique-00000-of-00001.parquet", [("u", png(RED), png(BLUE), 1.0)])
    assert [p.caption for p in load_pickapic(str(tmp_path), "validation")] == ["v"]
    assert [p.caption for p in load_pickapic(str(tmp_path), "validation_unique")] == ["u"]
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*'test'"):
        load_pickapic(str(tmp_path), "test")


def test_missing_column_names_column_and_file(tmp_path):
    path = tmp_path / "train" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"caption": ["c"], "jpg_0": [png(RED)], "jpg_1": [png(BLUE)], "label_0": [1.0]}), path)
    with pytest.raises(ValueError, match=r"part-0\.parquet: missing column\(s\) label_1"):
        load_pickapic(str(tmp_path), "train")


def test_hub_ids_fail_fast_and_clearly_offline(monkeypatch):
    # In case another test module imported these before HF_HUB_OFFLINE was set above.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.time()
    with pytest.raises(RuntimeError, match=r"(?s)yuvalkirstain/pickapic_v2.*Any hub id or local path"):
        load_pickapic("yuvalkirstain/pickapic_v2", "train")
    with pytest.raises(RuntimeError, match=r"(?s)THUDM/ImageRewardDB.*Any hub id or local folder"):
        load_imagereward("THUDM/ImageRewardDB", "train")
    with pytest.raises(RuntimeError, match=r"(?s)'partiprompts'.*nateraw/parti-prompts"):
        load_prompts("partiprompts")
    assert time.time() - start < 10


# ---------------------------------------------------------------- ImageRewardDB

# prompt_id -> ranks of its images (ties included); each image's colour encodes (prompt, position).
RANKS = {"p0": [1, 2, 3], "p1": [2, 1, 1, 3], "p2": [1, 1]}


def write_imagereward(root, split="train"):
    """metadata-<split>.parquet plus images/<split>/<split>_1.zip, the real ImageRewardDB layout."""
    rows = []
    (root / "images" / split).mkdir(parents=True)
    with zipfile.ZipFile(root / "images" / split / f"{split}_1.zip", "w") as archive:
        for k, (pid, ranks) in enumerate(RANKS.items()):
            for i, rank in enumerate(ranks):
                name = f"{pid}_{i}.png"
                archive.writestr(f"{split}_1/{name}", png((10 * k, 10 * i, rank)))
                rows.append(dict(image_path=f"images/{split}/{split}_1/{name}", prompt_id=pid,
                                 prompt=f"prompt {pid}", rank=rank, overall_rating=rank))
    pq.write_table(pa.Table.from_pylist(rows), root / f"metadata-{split}.parquet")
    return rows


def test_imagereward_pairs_count_and_order(tmp_path):
    write_imagereward(tmp_path)
    pairs = imagereward_pairs(load_imagereward(str(tmp_path), "train"))
    expected = sum(a != b for ranks in RANKS.values() for a, b in itertools.combinations(ranks, 2))
    assert len(pairs) == expected == 3 + 5 + 0
    for pair in pairs:  # the blue channel holds the rank: the winner's is lower
        assert color_of(pair.image_w)[2] < color_of(pair.image_l)[2]
        assert pair.caption.startswith("prompt p")
    assert len(imagereward_pairs(load_imagereward(str(tmp_path), "train"), keep_ties=True)) == 3 + 6 + 1
    assert len(load_pairs("imagereward", str(tmp_path), "train", max_pairs=4)) == 4
    assert len(load_pairs("imagereward", str(tmp_path / "metadata-train.parquet"), "train")) == expected

    # Zip members read inside forked DataLoader workers, each with its own zip handle.
    loader = torch.utils.data.DataLoader(PairDataset(pairs, 4, True, 0), batch_size=3, num_workers=2,
                                         collate_fn=collate_skip_none)
    batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == expected and sum(b["num_skipped"] for b in batches) == 0


def test_imagereward_zip_equals_unzipped(tmp_path):
    zipped, unzipped = tmp_path / "zipped", tmp_path / "unzipped"
    zipped.mkdir()
    rows = write_imagereward(zipped)
    with zipfile.ZipFile(zipped / "images" / "train" / "train_1.zip") as archive:
        archive.extractall(unzipped / "images" / "train")  # members are train_1/<file>
    for row in rows:
        from_zip = read_imagereward_image(str(zipped), row["image_path"])
        from_file = read_imagereward_image(str(unzipped), row["image_path"])
        assert from_zip == from_file == (unzipped / row["image_path"]).read_bytes()
    with pytest.raises(FileNotFoundError, match="train_9"):
        read_imagereward_image(str(zipped), "images/train/train_9/x.png")


def test_imagereward_embedded_images_and_empty_prompt(tmp_path, caplog):
    rows = [dict(image={"bytes": png((0, 0, r)), "path": None}, prompt_id="p", prompt="p", rank=r) for r in (2, 1, 3)]
    rows.append(dict(image={"bytes": png(RED), "path": None}, prompt_id="q", prompt="  ", rank=1))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "metadata-test.parquet")
    with caplog.at_level(logging.WARNING):
        loaded = load_imagereward(str(tmp_path), "test")
    assert "): 4 rows read, 3 kept, 1 broken skipped (1 empty prompt)\n" in caplog.text
    pairs = imagereward_pairs(loaded)
    assert [(color_of(p.image_w)[2], color_of(p.image_l)[2]) for p in pairs] == [(1, 2), (2, 3), (1, 3)]


# ---------------------------------------------------------------- preprocessing and the training Dataset


def test_preprocess_shape_range_centre_crop_and_flip():
    image = Image.new("RGB", (20, 40), WHITE)  # tall: red top quarter, blue bottom quarter, cropped away
    image.paste(RED, (0, 0, 20, 10))
    image.paste(BLUE, (0, 30, 20, 40))
    x = preprocess(image, 10, flip=False)
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    reference = image.resize((10, 20), Image.BILINEAR).crop((0, 5, 10, 15))  # shorter side -> 10, centre rows
    expected = torch.from_numpy(np.asarray(reference, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    assert (x[:, 2:8] > 0.99).all()  # the middle rows are the white band

    noise = Image.frombytes("RGB", (37, 23), os.urandom(37 * 23 * 3))
    y = preprocess(noise, 16, flip=False)
    assert y.shape == (3, 16, 16) and y.min() >= -1 and y.max() <= 1
    assert torch.equal(preprocess(noise, 16, flip=True), y.flip(-1))
    assert preprocess(Image.new("L", (5, 5), 0), 4, False).shape == (3, 4, 4)
    assert preprocess(Image.new("RGBA", (5, 5), (255,) * 4), 4, False).eq(1).all()
    assert preprocess(Image.new("RGB", (5, 5), 0), 4, False).eq(-1).all()


def test_flip_decision_deterministic_and_balanced():
    decisions = [flip_decision(0, i, which) for i in range(200) for which in ("w", "l")]
    assert decisions == [flip_decision(0, i, which) for i in range(200) for which in ("w", "l")]
    assert 150 < sum(decisions) < 250
    assert any(flip_decision(0, i, "w") != flip_decision(0, i, "l") for i in range(20))
    assert [flip_decision(0, i, "w") for i in range(50)] != [flip_decision(1, i, "w") for i in range(50)]


def test_pair_dataset_flips_each_image_from_its_hash(pickapic):
    pairs = load_pickapic(str(pickapic), "train")
    a, b = PairDataset(pairs, 8, random_flip=True, seed=3), PairDataset(pairs, 8, random_flip=True, seed=3)
    decisions = {flip_decision(3, i, which) for i in range(2) for which in "wl"}
    assert decisions == {True, False}  # the seed exercises both branches
    for i in range(2):
        item = a[i]
        assert item["caption"] == pairs[i].caption and item["index"] == i
        for key, image, which in (("pixel_w", pairs[i].image_w, "w"), ("pixel_l", pairs[i].image_l, "l")):
            assert torch.equal(item[key], preprocess(decode_image(image), 8, flip_decision(3, i, which)))
            assert torch.equal(item[key], b[i][key])
        unflipped = PairDataset(pairs, 8, random_flip=False, seed=3)[i]
        assert torch.equal(unflipped["pixel_w"], preprocess(decode_image(pairs[i].image_w), 8, False))


def test_broken_image_skipped_and_counted(pickapic, caplog):
    dataset = PairDataset(load_pickapic(str(pickapic), "train"), 8, random_flip=False, seed=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_skip_none)))
    assert "pair 2: undecodable image" in caplog.text
    assert batch["num_skipped"] == 1 and batch["caption"] == ["red wins", "blue wins"]
    assert batch["pixel_w"].shape == batch["pixel_l"].shape == (2, 3, 8, 8)
    assert batch["index"].tolist() == [0, 1]
    assert collate_skip_none([None, None]) is None


# ---------------------------------------------------------------- single images and prompt sets


def test_captioned_images_and_binary(tmp_path, caplog):
    features = datasets.Features({"caption": datasets.Value("string"), "image": datasets.Image()})
    captioned = datasets.Dataset.from_dict(
        {"caption": ["a red square", ""], "image": [Image.new("RGB", (4, 4), RED)] * 2}, features=features
    )
    captioned.to_parquet(str(tmp_path / "pretrain.parquet"))  # typed `Image`: must still come back encoded
    with caplog.at_level(logging.WARNING):
        rows = load_captioned_images(str(tmp_path / "pretrain.parquet"))
    assert "1 empty captions" in caplog.text
    assert len(rows) == 1 and rows[0]["caption"] == "a red square" and color_of(rows[0]["image"]) == RED

    (tmp_path / "binary").mkdir()
    for split, labels in (("train", [1, 0, 1]), ("validation", [0])):
        table = {"prompt": [f"p{i}" for i in range(len(labels))], "image": [png(GREEN)] * len(labels), "label": labels}
        pq.write_table(pa.table(table), tmp_path / "binary" / f"{split}.parquet")
    train = load_binary(str(tmp_path / "binary"), "train")
    assert train["label"][:] == [1, 0, 1] and color_of(train[0]["image"]) == GREEN
    assert len(load_binary(str(tmp_path / "binary"), "validation")) == 1


def test_load_prompts(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a dog  \n\n")
    assert load_prompts(str(tmp_path / "prompts.txt")) == ["a cat", "a dog"]

    hps = tmp_path / "hps"
    hps.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hps / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(3)]))
    prompts = load_prompts(str(hps))
    assert len(prompts) == 12 and prompts[0] == "anime 0" and prompts[-1] == "photo 2"
    (hps / "photo.json").unlink()
    with pytest.raises(FileNotFoundError, match="photo.json"):
        load_prompts(str(hps))

    pq.write_table(pa.table({"caption": ["x", "y", "x"]}), tmp_path / "captions.parquet")
    assert load_prompts(str(tmp_path / "captions.parquet")) == ["x", "y"]
    with pytest.raises(FileNotFoundError, match="hpsv2"):
        load_prompts("hpsv2")
    with pytest.raises(FileNotFoundError, match="no-such-file.txt"):
        load_prompts(str(tmp_path / "no-such-file.txt"))
