import io
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
