import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder
from seit.data.image_source import ImageReadError, ImageRecord, decode_image, list_source, load_image, scan_source, to_rgb


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


def _decode_png(img: Image.Image, **save) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return decode_image(buf.getvalue(), img.width, "test.png").transpose(1, 2, 0)


def test_16bit_grayscale_png_matches_its_8bit_version():
    gray8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for wide in (Image.fromarray(gray8.astype(np.uint16) * 257),  # I;16
                 Image.frombytes("I;16B", (16, 16), (gray8.astype(">u2") * 257).tobytes()),
                 Image.fromarray(gray8.astype(np.int32) * 257, "I")):
        buf = io.BytesIO()
        wide.save(buf, format="TIFF")  # TIFF keeps each mode as it is (PNG stores them all as I;16)
        got = decode_image(buf.getvalue(), 16, "wide.tif")
        assert np.abs(got.astype(int) - gray8[None].astype(int)).max() <= 1, wide.mode
    assert np.abs(_decode_png(Image.fromarray(gray8.astype(np.uint16) * 257))[..., 0].astype(int)
                  - gray8).max() <= 1


def test_every_mode_decodes_to_the_pixels_it_means():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    for mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB"):
        img = base.convert(mode)
        want = np.asarray(img.convert("RGB"), np.int64)  # Pillow's own conversion is right for these
        buf = io.BytesIO()
        img.save(buf, format="TIFF")
        got = decode_image(buf.getvalue(), 8, f"x-{mode}.tif").transpose(1, 2, 0)
        assert np.abs(got.astype(np.int64) - want).max() <= 1, mode
    hsv = base.convert("HSV")  # no file format stores HSV: convert it as it is
    assert np.abs(np.asarray(to_rgb(hsv), np.int64) - np.asarray(hsv.convert("RGB"), np.int64)).max() <= 1
    unit = rgb[..., 0].astype(np.float32) / 255
    buf = io.BytesIO()
    Image.fromarray(unit, "F").save(buf, format="TIFF")
    assert np.abs(decode_image(buf.getvalue(), 8, "f.tif")[0].astype(int) - rgb[..., 0]).max() <= 1


def test_transparency_is_composited_onto_white_in_every_alpha_mode():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: white
    rgba[:4, :, 3] = 255  # opaque red rows
    want = np.where(np.arange(8)[:, None, None] < 4, [200, 0, 0], [255, 255, 255])
    img = Image.fromarray(rgba, "RGBA")
    assert (_decode_png(img) == want).all()
    pal = Image.fromarray((np.arange(8)[:, None] >= 4).repeat(8, 1).astype(np.uint8), "P")
    pal.putpalette([200, 0, 0, 0, 0, 255])  # index 0 red, index 1 blue and transparent
    assert (_decode_png(pal, transparency=1) == want).all()
    la = Image.fromarray(np.stack([np.full((8, 8), 100, np.uint8), rgba[..., 3]], -1), "LA")
    assert (_decode_png(la)[..., 0] == np.where(np.arange(8)[:, None] < 4, 100, 255)).all()


def test_exif_orientation_is_applied():
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, 4:] = 255  # white right half
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 3  # stored upside down: shown rotated by 180 degrees
    got = _decode_png(img, exif=exif)
    assert got[:, :4].min() > 200 and got[:, 4:].max() < 50


def test_broken_symlink_is_an_image_read_error(tmp_path):
    make_image_folder(tmp_path, classes=1, train=1, val=1)
    link = tmp_path / "train" / "class0" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    rec = next(r for r in scan_source(tmp_path)[0]["train"] if r.path == str(link))
    with pytest.raises(ImageReadError, match="gone.png"):
        load_image(rec, 8)


def _tar_of_pngs(path, n=3):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_truncated_tar_names_the_tar_and_the_member(tmp_path):
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "shard.tar"
    members = _tar_of_pngs(path)
    data = path.read_bytes()
    path.write_bytes(data[: members[2].offset_data + 100])  # inside the last member's bytes
    with pytest.raises(ImageReadError, match=r"shard\.tar: .*; member s2\.png is truncated"):
        scan_source(tmp_path)
    path.write_bytes(data[: members[1].offset + 200])  # inside the second member's header
    with pytest.raises(ImageReadError, match=r"shard\.tar: unreadable or truncated member header, after member s0\.png"):
        scan_source(tmp_path)
    recs = [ImageRecord("s2", -1, str(path), members[2].offset_data, members[2].size)]  # cut after the listing
    with pytest.raises(ImageReadError, match=r"shard\.tar: member s2 is truncated"):
        load_image(recs[0], 8)


def test_files_that_are_not_tokenized_are_listed(tmp_path):
    make_image_folder(tmp_path, classes=2, train=2, val=1)
    (tmp_path / "train" / "notes.txt").write_text("loose file beside the class folders")
    (tmp_path / "train" / "class0" / "meta.json").write_text("{}")
    (tmp_path / "README").write_text("beside the splits")
    listing = list_source(tmp_path)
    assert sorted(Path(p).name for p in listing.ignored) == ["README", "meta.json", "notes.txt"]
    assert len(listing.splits["train"]) == 4


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_key_twice_in_a_source_tar_is_refused_by_name(tmp_path):
    # s000.jpeg would replace s000.jpg: half the images lost without a word (#57)
    _tar(tmp_path / "train" / "000.tar", [("s000.jpg", _jpeg(0)), ("s000.cls", b"0"), ("s000.jpeg", _jpeg(1)),
                                          ("s000.cls", b"1"), ("s002.jpg", _jpeg(2)), ("s002.cls", b"1")])
    with pytest.raises(ImageReadError, match=r"000\.tar: key s000 appears twice \(s000\.jpg and s000\.jpeg\)"):
        list_source(tmp_path)


def test_a_tar_sample_without_a_label_beside_labelled_ones_is_refused(tmp_path):
    # it would get label -1 and break classification later (#58)
    _tar(tmp_path / "train" / "000.tar", [("s0.jpg", _jpeg(0)), ("s0.cls", b"0"), ("s1.jpg", _jpeg(1)),
                                          ("s2.jpg", _jpeg(2)), ("s2.cls", b"1")])
    with pytest.raises(ValueError, match=r"000\.tar: sample s1 has no member s1\.cls, while 2 of the 3 samples"):
        list_source(tmp_path)


def test_a_tar_label_that_is_not_a_class_index_is_named(tmp_path):
    _tar(tmp_path / "train" / "000.tar", [("s0.jpg", _jpeg(0)), ("s0.cls", b"cat")])
    with pytest.raises(ImageReadError, match=r"000\.tar: member s0\.cls holds b'cat', not a class index"):
        list_source(tmp_path)


def test_a_tar_label_without_its_image_is_listed_as_not_tokenized(tmp_path):
    tar = _tar(tmp_path / "train" / "000.tar", [("s0.jpg", _jpeg(0)), ("s0.cls", b"0"), ("s1.cls", b"1")])
    listing = list_source(tmp_path)
    assert [r.key for r in listing.splits["train"]] == ["s0"] and listing.ignored == [f"{tar}:s1.cls"]


def test_an_image_beside_the_class_folders_is_refused_by_name(tmp_path):
    make_image_folder(tmp_path, classes=2, train=2, val=1)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "stray.png")
    with pytest.raises(ValueError, match=r"train/stray\.png \(and 0 more\) is an image beside the class folders"):
        list_source(tmp_path)


def test_an_unlabelled_split_and_empty_classes_are_counted(tmp_path):
    # class folders in train, loose images in val (#59); an empty class folder (#53); a class only in val (#54)
    make_image_folder(tmp_path, classes=2, train=2, val=0)
    (tmp_path / "train" / "class2").mkdir()
    for d in (tmp_path / "val").iterdir():
        d.rmdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / f"v{i}.png")
    listing = list_source(tmp_path)
    assert listing.classes == ["class0", "class1", "class2"]
    assert listing.unlabelled() == {"train": 0, "val": 3}
    assert listing.empty_classes() == {"train": ["class2"], "val": ["class0", "class1", "class2"]}


def test_a_text_file_named_jpg_is_named_without_python_object_noise(tmp_path):
    with pytest.raises(ImageReadError, match=r"cannot read image .*readme\.jpg: not an image file") as err:
        decode_image(b"just some text", 8, str(tmp_path / "readme.jpg"))
    assert "BytesIO" not in str(err.value)


def test_a_tar_cut_after_a_member_says_so(tmp_path):
    path = _tar(tmp_path / "train" / "000.tar", [("s0.jpg", _jpeg(0)), ("s0.cls", b"0"), ("s1.jpg", _jpeg(1)),
                                                 ("s1.cls", b"1"), ("s2.jpg", _jpeg(2)), ("s2.cls", b"2")])
    with tarfile.open(path) as tar:
        cls = tar.getmember("s1.cls")
    os.truncate(path, cls.offset_data + 300)  # inside s1.cls's padding: s2's header is gone
    with pytest.raises(ImageReadError, match=r"000\.tar: the file ends after member s1\.cls \(cut short"):
        list_source(tmp_path)
