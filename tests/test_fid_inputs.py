"""Bad input and file formats of the metrics and fid.py: clear errors, files pytorch-fid reads and writes."""

import numpy as np
import pytest
import torch
from PIL import Image

from pytorch_fid.fid_score import compute_statistics_of_path

import fid as fid_cli
from minigen.fid import features, metrics
from minigen.fid.inception import FIDInceptionV3
from minigen.io import save_safetensors


def test_stats_npz_round_trips_with_pytorch_fid(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=8), np.cov(rng.normal(size=(20, 8)), rowvar=False)
    metrics.save_stats(tmp_path / "ours.npz", mu, sigma)
    theirs_mu, theirs_sigma = compute_statistics_of_path(str(tmp_path / "ours.npz"), None, 1, 8, "cpu")
    np.testing.assert_array_equal(theirs_mu, mu)
    np.testing.assert_array_equal(theirs_sigma, sigma)
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu, sigma=sigma)  # what pytorch-fid --save-stats writes
    loaded = metrics.load_stats(tmp_path / "theirs.npz")
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)


@pytest.mark.parametrize("arrays, message", [
    ({"mean": np.zeros(4), "cov": np.eye(4)}, "needs arrays 'mu' and 'sigma'"),
    ({"mu": np.zeros(4), "sigma": np.eye(3)}, "mu must be"),
    ({"mu": np.zeros((2, 2)), "sigma": np.eye(2)}, "mu must be"),
])
def test_load_stats_rejects_bad_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        metrics.load_stats(tmp_path / "s.npz")


def test_load_stats_rejects_non_npz(tmp_path):
    (tmp_path / "s.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable .npz"):
        metrics.load_stats(tmp_path / "s.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        metrics.load_stats(tmp_path / "one.npy")


def test_cli_rejects_stats_of_other_dims_and_kid_on_stats(tmp_path):
    metrics.save_stats(tmp_path / "a.npz", np.zeros(64), np.eye(64))
    metrics.save_stats(tmp_path / "b.npz", np.zeros(2048), np.eye(2048))
    weights = tmp_path / "w.safetensors"  # a classifier-less checkpoint; .npz inputs never load it
    save_safetensors({k: v for k, v in FIDInceptionV3(classifier=False).state_dict().items()
                      if not k.endswith("num_batches_tracked")}, weights)
    with pytest.raises(ValueError, match="64-d statistics but --dims is 2048"):
        fid_cli.compute([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--weights", str(weights)])
    with pytest.raises(ValueError, match="KID, IS and PSNR need images"):
        fid_cli.compute([str(tmp_path / "b.npz"), str(tmp_path / "b.npz"), "--weights", str(weights), "--kid"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        fid_cli.compute([str(tmp_path / "missing"), str(tmp_path / "b.npz"), "--weights", str(weights)])
    for i in range(10):  # enough for IS's 10 splits: the missing classifier is the one fault
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(FileNotFoundError, match="no 1008-class classifier"):
        fid_cli.compute([str(tmp_path), str(tmp_path), "--weights", str(weights), "--is"])
    # Same dims from .npz only: FID of identical statistics is 0 (no images, no Inception forward).
    assert fid_cli.compute([str(tmp_path / "a.npz")] * 2 + ["--weights", str(weights), "--dims", "64"])["fid"] \
        == pytest.approx(0, abs=1e-9)


def test_extract_features_counts_unreadable_and_handles_mixed_modes(tmp_path):
    model = FIDInceptionV3(classifier=False).eval()
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(tmp_path / "a.png")  # transparent: white after compositing
    Image.new("L", (30, 40), 255).save(tmp_path / "b.png")  # grey
    Image.new("RGB", (30, 40), (255, 255, 255)).save(tmp_path / "c.jpg", quality=100)
    (tmp_path / "d.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        feats = features.extract_features(model, tmp_path, outputs=("64",), batch_size=2, workers=2, progress=False)
    assert len(feats) == 3 and [p.name for p in feats.skipped] == ["d.jpg"]
    # All three are white images: same features whatever their mode or size.
    np.testing.assert_allclose(feats["64"][0], feats["64"][1], atol=1e-4)
    np.testing.assert_allclose(feats["64"][0], feats["64"][2], atol=1e-4)


def test_tensor_input_matches_file_input(tmp_path):
    """A generator's float samples (no uint8 round trip needed) give the features of the same pixels saved as PNG."""
    model = FIDInceptionV3(classifier=False).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 24), dtype=torch.uint8)
    for i, img in enumerate(pixels):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    from_files = features.extract_features(model, tmp_path, ("64",), progress=False)["64"]
    from_tensor = features.extract_features(model, pixels.float() / 255, ("64",), progress=False)["64"]
    np.testing.assert_allclose(from_tensor, from_files, rtol=0, atol=1e-6)


def test_clean_mode_resizes_with_pil_bicubic_on_float_channels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = features.clean_resize(img)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    red = np.asarray(Image.fromarray(img[..., 0].astype(np.float32), "F").resize((299, 299), Image.BICUBIC))
    np.testing.assert_array_equal(out[..., 0], np.clip(red, 0, 255))
    assert np.abs(out - features.to_inception_input([img], torch.device("cpu"))[0].permute(1, 2, 0).numpy()).max() > 1


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.choice([-5, 5], a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert metrics.psnr(a, a) == float("inf")
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255)
    assert metrics.ssim(a, noisy) < metrics.ssim(a, b) < 1
    with pytest.raises(ValueError, match="different shapes"):
        metrics.psnr(a, a[:10])


def test_paired_metrics_pair_by_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    img = np.full((16, 16, 3), 100, np.uint8)
    Image.fromarray(img).save(tmp_path / "a" / "x.png")
    Image.fromarray(img + 10).save(tmp_path / "b" / "x.png")
    Image.fromarray(img).save(tmp_path / "b" / "unpaired.png")
    result = metrics.paired_metrics(tmp_path / "a", tmp_path / "b")
    assert result["pairs"] == 1 and result["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / 100))
    Image.fromarray(img[:8]).save(tmp_path / "a" / "unpaired.png")
    with pytest.raises(ValueError, match="differ in size"):
        metrics.paired_metrics(tmp_path / "a", tmp_path / "b")


def test_kid_and_is_small_inputs():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="subset size reduced to 30"):
        metrics.kid(rng.normal(size=(30, 8)), rng.normal(size=(40, 8)), subsets=3)
    with pytest.raises(ValueError, match="different dims"):
        metrics.kid(rng.normal(size=(30, 8)), rng.normal(size=(30, 9)))
    with pytest.raises(ValueError, match="at least 10 images"):
        metrics.inception_score(rng.normal(size=(5, 1008)))
