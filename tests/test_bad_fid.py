"""fid.py against bad input (issue 12): a corpus of broken statistics, folders, weights, outputs and flags, built here.

Each case ends with exit code 2 and one `fid.py: error: ...` line naming the file or flag, no traceback; every file
of the corpus is byte-identical afterwards and nothing new (no statistics, no hidden temporary file) is left.
Random Inception weights stand in for the real ones (their numbers are never looked at) and --dims 64 runs only the
network's first block, so each case takes a fraction of a second.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from cli_errors import assert_clean_error, clean_error_params
from corpus import fails_cleanly, snapshot
from test_fid_parity import random_inception

import fid
from minigen.fid import metrics
from minigen.io import save_safetensors

LONG = "x" * 300  # one path component longer than any file system allows (ENAMETOOLONG)


def save_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:  # np.savez on a path would append ".npz" to names without it
        np.savez(f, **arrays)


def save_images(folder: Path, count: int, broken: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(broken):
        (folder / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def build_npz_corpus(root: Path) -> None:
    eye, zeros = np.eye(64), np.zeros(64)
    metrics.save_stats(root / "good.npz", zeros, eye)
    metrics.save_stats(root / "good192.npz", np.zeros(192), np.eye(192))
    (root / "not_a_zip.npz").write_bytes(b"these bytes are not a zip archive")
    (root / "empty.npz").write_bytes(b"")
    whole = (root / "good.npz").read_bytes()
    (root / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    save_npz(root / "no_mu.npz", mean=zeros, sigma=eye)
    save_npz(root / "no_sigma.npz", mu=zeros, cov=eye)
    save_npz(root / "mu_2d.npz", mu=np.zeros((8, 8)), sigma=eye)
    save_npz(root / "sigma_not_square.npz", mu=zeros, sigma=np.zeros((64, 63)))
    save_npz(root / "dims_disagree.npz", mu=zeros, sigma=np.eye(32))
    save_npz(root / "object_arrays.npz", mu=np.array([{"a": 1}] * 64, dtype=object), sigma=eye)
    save_npz(root / "strings.npz", mu=np.array(["0"] * 64), sigma=eye)
    save_npz(root / "complex.npz", mu=zeros, sigma=eye.astype(np.complex128))
    save_npz(root / "nan_mu.npz", mu=np.where(np.arange(64) == 3, np.nan, 0.0), sigma=eye)
    save_npz(root / "inf_sigma.npz", mu=zeros, sigma=np.where(eye == 1, np.inf, 0.0))
    save_npz(root / "asymmetric.npz", mu=zeros, sigma=eye + np.triu(np.ones((64, 64)), 1))
    save_npz(root / "empty_arrays.npz", mu=np.zeros(0), sigma=np.zeros((0, 0)))
    save_npz(root / "huge.npz", mu=np.full(64, 1e200), sigma=eye)  # finite, but the FID overflows
    with open(root / "single_array.npz", "wb") as f:
        np.save(f, zeros)
    (root / "folder.npz").mkdir()


def build_folder_corpus(root: Path) -> None:
    save_images(root / "images", 3)
    save_images(root / "more_images", 3)
    (root / "empty_folder").mkdir()
    save_images(root / "all_broken", 0, broken=2)
    save_images(root / "one_image", 1)
    save_images(root / "one_readable", 1, broken=2)
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("not an image")
    (root / "regular_file").write_text("a file, not a folder")


def build_weights_corpus(root: Path) -> None:
    state = {k: v for k, v in random_inception().state_dict().items() if not k.endswith("num_batches_tracked")}
    save_safetensors(state, root / "inception.safetensors")
    save_safetensors({**state, "fc.bias": torch.zeros(7)}, root / "wrong_shape.safetensors")
    nan = state["Conv2d_1a_3x3.conv.weight"].clone()
    nan[0, 0, 0, 0] = float("nan")
    save_safetensors({**state, "Conv2d_1a_3x3.conv.weight": nan}, root / "nan_weights.safetensors")
    save_safetensors({"model.weight": torch.zeros(4, 4)}, root / "other_model.safetensors")
    whole = (root / "inception.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(whole[: len(whole) // 3])
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    torch.save({"model.weight": torch.zeros(2)}, root / "pickle_named.safetensors")  # a pickle under another suffix
    with open(root / "unsafe.pth", "wb") as f:  # needs code to load: weights_only=True refuses it
        pickle.dump(SimpleNamespace(weight=1), f)
    torch.save([torch.zeros(2)], root / "list.pth")
    (root / "weights_folder").mkdir()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_fid")
    build_npz_corpus(root)
    build_folder_corpus(root)
    build_weights_corpus(root)
    return root


# Each case: (argv with {root} for the corpus folder, what the error line must name). Without a flag of their own,
# cases get --dims 64 and the good weights.
NPZ = "{root}/good.npz"
IMAGES = "{root}/images"
CASES = {
    # .npz statistics
    "npz-not-a-zip": (["{root}/not_a_zip.npz", NPZ], ["not_a_zip.npz", "not a readable .npz"]),
    "npz-empty-file": (["{root}/empty.npz", NPZ], ["empty.npz", "not a readable .npz"]),
    "npz-truncated": (["{root}/truncated.npz", NPZ], ["truncated.npz", "not a readable .npz"]),
    "npz-missing-mu": (["{root}/no_mu.npz", NPZ], ["no_mu.npz", "missing ['mu']"]),
    "npz-missing-sigma": ([NPZ, "{root}/no_sigma.npz"], ["no_sigma.npz", "missing ['sigma']"]),
    "npz-mu-2d": (["{root}/mu_2d.npz", NPZ], ["mu_2d.npz", "mu must be (D,)"]),
    "npz-sigma-not-square": (["{root}/sigma_not_square.npz", NPZ], ["sigma_not_square.npz", "(64, 63)"]),
    "npz-mu-sigma-dims-disagree": (["{root}/dims_disagree.npz", NPZ], ["dims_disagree.npz", "(32, 32)"]),
    "npz-object-arrays-need-pickle": (["{root}/object_arrays.npz", NPZ], ["object_arrays.npz", "pickle"]),
    "npz-strings": (["{root}/strings.npz", NPZ], ["strings.npz", "real numbers"]),
    "npz-complex": (["{root}/complex.npz", NPZ], ["complex.npz", "real numbers"]),
    "npz-nan-mu": (["{root}/nan_mu.npz", NPZ], ["nan_mu.npz", "mu holds 1 NaN or inf"]),
    "npz-inf-sigma": ([NPZ, "{root}/inf_sigma.npz"], ["inf_sigma.npz", "sigma holds 64 NaN or inf"]),
    "npz-asymmetric-sigma": (["{root}/asymmetric.npz", NPZ], ["asymmetric.npz", "not symmetric"]),
    "npz-zero-dims": (["{root}/empty_arrays.npz", NPZ], ["empty_arrays.npz", "D >= 1"]),
    "npz-fid-overflows": (["{root}/huge.npz", NPZ], ["huge.npz", "distance is inf"]),
    "npz-single-array": (["{root}/single_array.npz", NPZ], ["single_array.npz", "single array"]),
    "npz-is-a-folder": (["{root}/folder.npz", NPZ], ["folder.npz", "a folder"]),
    "npz-missing": (["{root}/missing.npz", NPZ], ["missing.npz", "no such"]),
    "npz-other-dims": (["{root}/good192.npz", NPZ], ["good192.npz", "192-d statistics but --dims is 64"]),
    "npz-with-kid": ([NPZ, NPZ, "--kid"], ["good.npz", "need images"]),
    "npz-with-psnr": ([NPZ, IMAGES, "--psnr"], ["good.npz", "need images"]),
    # image folders
    "folder-empty": (["{root}/empty_folder", IMAGES], ["empty_folder", "no images"]),
    "folder-without-images": (["{root}/no_images", IMAGES], ["no_images", "no images"]),
    "folder-all-broken": ([IMAGES, "{root}/all_broken"], ["all_broken", "no readable images"]),
    "folder-one-image": (["{root}/one_image", IMAGES], ["one_image", "needs at least 2 images"]),
    "folder-one-readable": ([IMAGES, "{root}/one_readable"], ["one_readable", "needs at least 2 images"]),
    "folder-is-an-image-file": (["{root}/images/0.png", IMAGES], ["0.png", "expected a folder"]),
    "folder-is-a-text-file": (["{root}/regular_file", IMAGES], ["regular_file", "expected a folder"]),
    "folder-missing": (["{root}/nowhere", IMAGES], ["nowhere", "no such folder"]),
    "folder-under-a-file": (["{root}/regular_file/images", IMAGES], ["regular_file/images"]),
    "folder-name-too-long": ([f"{{root}}/{LONG}", IMAGES], ["name too long"]),
    "folder-too-few-for-is": ([IMAGES, "{root}/more_images", "--is"], ["images", "at least 10 images"]),
    # Inception weights
    "weights-missing": ([IMAGES, IMAGES, "--weights", "{root}/nope.safetensors"], ["nope.safetensors"]),
    "weights-a-folder": ([IMAGES, IMAGES, "--weights", "{root}/weights_folder"], ["weights_folder", "a folder"]),
    "weights-truncated": ([IMAGES, IMAGES, "--weights", "{root}/truncated.safetensors"],
                          ["truncated.safetensors", "truncated"]),
    "weights-corrupt-header": ([IMAGES, IMAGES, "--weights", "{root}/garbage.safetensors"], ["garbage.safetensors"]),
    "weights-of-another-model": ([IMAGES, IMAGES, "--weights", "{root}/other_model.safetensors"],
                                 ["other_model.safetensors", "not an FID Inception checkpoint"]),
    "weights-wrong-shape": ([IMAGES, IMAGES, "--weights", "{root}/wrong_shape.safetensors"],
                            ["wrong_shape.safetensors", "fc.bias has shape (7,)"]),
    "weights-nan": ([IMAGES, IMAGES, "--weights", "{root}/nan_weights.safetensors"],
                    ["nan_weights.safetensors", "NaN or inf"]),
    "weights-pickle-named-safetensors": ([IMAGES, IMAGES, "--weights", "{root}/pickle_named.safetensors"],
                                         ["pickle_named.safetensors"]),
    "weights-unsafe-pickle": ([IMAGES, IMAGES, "--weights", "{root}/unsafe.pth"], ["unsafe.pth", "weights_only"]),
    "weights-pickle-of-a-list": ([IMAGES, IMAGES, "--weights", "{root}/list.pth"], ["list.pth", "expected a dict"]),
    # --save-stats targets: checked before any image is measured
    "save-stats-exists": (["--save-stats", IMAGES, NPZ], ["good.npz", "exists"]),
    "save-stats-under-a-file": (["--save-stats", IMAGES, "{root}/regular_file/out.npz"],
                                ["regular_file", "not a folder"]),
    "save-stats-name-too-long": (["--save-stats", IMAGES, f"{{root}}/{LONG}.npz"], ["name too long"]),
    "save-stats-not-npz": (["--save-stats", IMAGES, "{root}/stats.txt"], ["stats.txt", ".npz"]),
    "save-stats-with-kid": (["--save-stats", IMAGES, "{root}/out.npz", "--kid"], ["--save-stats"]),
    # flags
    "dims-not-an-inception-block": ([NPZ, NPZ, "--dims", "100"], ["--dims"]),
    "batch-size-0": ([IMAGES, IMAGES, "--batch-size", "0"], ["--batch-size", ">= 1"]),
    "workers-0": ([IMAGES, IMAGES, "--workers", "0"], ["--workers"]),
    "device-without-cuda": ([IMAGES, IMAGES, "--device", "cuda:0"], ["--device"]),
    "mode-unknown": ([IMAGES, IMAGES, "--mode", "tf"], ["--mode"]),
    "three-paths": ([NPZ, NPZ, NPZ], ["two paths"]),
    "one-path": ([NPZ], ["two paths"]),
    "no-fid-and-nothing-else": ([IMAGES, IMAGES, "--no-fid"], ["--no-fid"]),
}


@pytest.mark.parametrize("argv, mentions", clean_error_params(CASES))
def test_bad_input_is_a_clean_error(corpus, capsys, argv, mentions):
    if "--dims" not in argv:
        argv = argv + ["--dims", "64"]
    if "--weights" not in argv:
        argv = argv + ["--weights", "{root}/inception.safetensors"]
    fails_cleanly(fid.main, [a.format(root=corpus) for a in argv], capsys, [m.format(root=corpus) for m in mentions],
                  corpus)


def test_the_corpus_is_fine_when_the_input_is(corpus, capsys):
    """The good files of the corpus work, so each case above fails for the one thing it breaks."""
    good = ["--dims", "64", "--weights", str(corpus / "inception.safetensors")]
    assert fid.compute([str(corpus / "good.npz")] * 2 + good)["fid"] == pytest.approx(0, abs=1e-9)
    result = fid.compute([str(corpus / "images"), str(corpus / "more_images")] + good)
    assert result["images"] == [3, 3] and np.isfinite(result["fid"])
    assert "Fréchet distance (64-d)..." in capsys.readouterr().err
    out = corpus / "new" / "stats.npz"
    fid.compute(["--save-stats", str(corpus / "images"), str(out)] + good)
    assert metrics.load_stats(out)[0].shape == (64,)
    out.unlink()
    out.parent.rmdir()


def test_a_full_disk_while_saving_statistics_leaves_nothing(corpus, capsys, monkeypatch):
    """ENOSPC in the middle of writing the .npz: a clean error naming the file, no partial or temporary file."""
    def write_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", write_then_fail)
    before = snapshot(corpus)
    assert_clean_error(fid.main, ["--save-stats", str(corpus / "images"), str(corpus / "full.npz"), "--dims", "64",
                                  "--weights", str(corpus / "inception.safetensors")], capsys,
                       "full.npz", "No space left on device")
    assert snapshot(corpus) == before
