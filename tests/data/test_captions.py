import json
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from aptp.data.captions import (
    coco_captions,
    collate_captions,
    folder_captions,
    tsv_captions,
    webdataset_captions,
)


def _img(path, colour=(255, 0, 0), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def coco(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        _img(tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "img" / "2.jpg").write_bytes(b"not a jpeg")  # corrupt
    ann = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)],
           "annotations": [{"image_id": i, "caption": f"cap {i}.{j}"} for i in range(3) for j in range(5)]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    return tmp_path


def test_coco_one_caption_per_image_is_seeded(coco):
    all_caps = coco_captions(coco / "captions.json", coco / "img", resolution=16)
    assert len(all_caps) == 15
    a = coco_captions(coco / "captions.json", coco / "img", resolution=16, one_per_image=True, seed=1)
    b = coco_captions(coco / "captions.json", coco / "img", resolution=16, one_per_image=True, seed=1)
    assert len(a) == 3 and a.captions == b.captions
    assert [c.split()[1].split(".")[0] for c in a.captions] == ["0", "1", "2"]


def test_corrupt_image_is_skipped_and_counted(coco):
    ds = coco_captions(coco / "captions.json", coco / "img", resolution=16, one_per_image=True)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_captions)))
    assert batch["image"].shape == (2, 3, 16, 16) and len(batch["caption"]) == 2
    assert ds.num_corrupt == 1
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_missing_and_malformed_files_name_the_file(tmp_path, coco):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_captions(tmp_path / "nope.json", coco / "img")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json is not a COCO captions file"):
        coco_captions(tmp_path / "bad.json", coco / "img")
    (tmp_path / "bad.tsv").write_text("text\turl\nx\ty\n")
    with pytest.raises(ValueError, match="bad.tsv must have a header"):
        tsv_captions(tmp_path / "bad.tsv")


def test_tsv_folder_and_webdataset(tmp_path):
    _img(tmp_path / "a.png", (0, 255, 0))
    (tmp_path / "a.txt").write_text("a green thing\n")
    _img(tmp_path / "b.png")  # no caption file: ignored
    (tmp_path / "c.tsv").write_text("caption\timage\na green thing\ta.png\n")
    folder = folder_captions(tmp_path, resolution=8)
    tsv = tsv_captions(tmp_path / "c.tsv", resolution=8)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(tmp_path / "a.png", arcname="0001.png")
        tar.add(tmp_path / "a.txt", arcname="0001.txt")
    wds = webdataset_captions([tmp_path / "shard.tar"], resolution=8)
    for ds in (folder, tsv, wds):
        assert len(ds) == 1 and ds[0]["caption"] == "a green thing"
        green = ds[0]["image"][1]
        assert torch.allclose(green, torch.ones_like(green), atol=0.02)
