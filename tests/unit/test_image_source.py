import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder
from seit.data.image_source import ImageReadError, load_image, scan_source


def test_imagefolder_with_splits(tmp_path):
    make_image_folder(tmp_path, classes=3, train=4, val=2)
    splits, classes = scan_source(tmp_path)
    assert classes == ["class0", "class1", "class2"]
    assert len(splits["train"]) == 12 and len(splits["val"]) == 6
    assert {r.label for r in splits["val"]} == {0, 1, 2}
    assert load_image(splits["train"][0], 24).shape == (3, 24, 24)


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"n0_{i}.JPEG", format="JPEG")
    splits, classes = scan_source(tmp_path)
    assert classes == [] and [r.label for r in splits["train"]] == [-1, -1, -1]


def test_tar_shards_of_jpegs(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    with tarfile.open(d / "shard-0.tar", "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(buf, format="JPEG")
            for name, data in ((f"s{i}.jpg", buf.getvalue()), (f"s{i}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    splits, classes = scan_source(tmp_path)
    recs = splits["train"]
    assert [r.label for r in recs] == [0, 1, 0, 1] and classes == ["0", "1"]
    assert load_image(recs[2], 8)[0, 0, 0] == pytest.approx(80, abs=3)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        scan_source(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        scan_source(tmp_path / "empty")


def test_unreadable_image_is_named(tmp_path):
    make_image_folder(tmp_path, classes=1, train=1, val=1)
    bad = tmp_path / "train" / "class0" / "broken.png"
    bad.write_bytes(b"not an image")
    splits, _ = scan_source(tmp_path)
    rec = next(r for r in splits["train"] if r.path == str(bad))
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image(rec, 8)
