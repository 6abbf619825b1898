"""FID during GAN training (minigen.gan.fid, train_gan.py --fid-every): the hook's number is minigen.fid.metrics' FID of
the same images, the training statistics are cached and reused, a tiny run logs and plots FID across a resume and
agrees with fid.py on `--sample` PNGs, and missing weights stop the run before training.

Every check here is an equality of numbers computed two ways, which holds for any feature network, so a tiny random
network with the FID Inception's interface stands in for it: the Inception's first block alone takes ~8 s per 71
images on the shared 2-core CPU. The Inception itself is proven against pytorch-fid in tests/test_fid_parity.py.
71 images give a non-singular 64x64 covariance.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import train_gan
from minigen.fid import features, inception, metrics
from minigen.gan import fid as gan_fid
from minigen.gan.data import ImageFolder
from minigen.gan.config import GANConfig
from minigen.gan.trainer import GANTrainer, noise_batches
from minigen.plot import signed_to_uint8

N_IMAGES = 71
TINY = dict(size=(32, 32), ngf=4, ndf=4, nz=8, batch=64, grid=4, fid_every=1, fid_samples=N_IMAGES, fid_dims=64)
TINY_FLAGS = ["--size", "32x32", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch", "64", "--grid", "4", "--quiet",
              "--fid-samples", str(N_IMAGES), "--fid-dims", "64"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


class TinyFeatures(torch.nn.Module):
    """The FID Inception's interface (model(x, outputs) -> {"64": (B, 64)} for x (B, 3, 299, 299)), 1000x cheaper."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 8 * 8, 64)

    def forward(self, x, outputs=("64",)):
        assert tuple(outputs) == ("64",) and x.shape[1:] == (3, 299, 299)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)  # (B, 192)
        return {"64": torch.tanh(self.proj(pooled))}  # (B, 64)


@pytest.fixture(scope="module")
def model():
    return TinyFeatures().eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """An empty minigen cache and torch hub: no weights, no statistics from elsewhere."""
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "cache"


def test_hook_value_is_frechet_distance_of_the_same_images(folder, model):
    cfg = GANConfig(data=str(folder), **TINY | {"fid_every": 2})
    trainer = GANTrainer(cfg)
    hook = gan_fid.fid_hook(cfg, model, progress=False)
    rng_before = trainer.rng.get_state()
    trainer.epoch = 1
    assert hook(trainer) == {}  # not a multiple of --fid-every
    trainer.epoch = 2
    value = hook(trainer)["fid"]
    assert torch.equal(trainer.rng.get_state(), rng_before)  # measuring leaves the training's randomness alone

    # The same computation by hand, through extract_features' tensor path (the hook uses the uint8-array path).
    fakes = torch.cat([trainer.generate(z) for z in noise_batches(N_IMAGES, cfg.nz, 64, cfg.seed)])
    fakes = torch.from_numpy(signed_to_uint8(fakes)).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32), 8-bit levels
    reals = ImageFolder(folder, cfg.size, progress=False).images.float() / 255  # (N, 3, 32, 32)
    stats = [metrics.statistics(features.extract_features(model, x, ("64",), progress=False)["64"])
             for x in (fakes, reals)]
    expected = metrics.frechet_distance(*stats[0], *stats[1])
    assert value > 0
    # Same arithmetic on both paths; 1e-6 relative allows for float32 summation order in the resize.
    assert value == pytest.approx(expected, rel=1e-6)


def test_training_stats_are_cached_once_and_reused(folder, model, cache, monkeypatch):
    cfg = GANConfig(data=str(folder), **TINY)
    extracted = []
    original = features.extract_features

    def spy(model, images, *args, **kwargs):
        extracted.append(len(images))
        return original(model, images, *args, **kwargs)

    monkeypatch.setattr(features, "extract_features", spy)
    gan_fid.fid_hook(cfg, model, progress=False)
    assert extracted == [N_IMAGES]
    (path,) = (cache / "fid_stats").glob("*.npz")
    assert path == gan_fid.stats_path(folder, cfg.size, 64)
    with np.load(path) as saved:  # pytorch-fid's format: mu (D,), sigma (D, D)
        assert saved["mu"].shape == (64,) and saved["sigma"].shape == (64, 64)

    gan_fid.fid_hook(cfg, model, progress=False)
    assert extracted == [N_IMAGES]  # the second hook read the .npz


def test_cache_key_changes_with_size_dims_and_image_count(folder, tmp_path):
    base = gan_fid.stats_path(folder, (32, 32), 64)
    assert base != gan_fid.stats_path(folder, (64, 64), 64)
    assert base != gan_fid.stats_path(folder, (32, 32), 2048)
    extra = tmp_path / "more"
    extra.mkdir()
    for p in folder.iterdir():
        (extra / p.name).write_bytes(p.read_bytes())
    assert gan_fid.stats_path(extra, (32, 32), 64) != base  # another folder
    Image.new("RGB", (8, 8)).save(extra / "new.png")
    assert gan_fid.stats_path(extra, (32, 32), 64).name.split("_")[2] == f"{N_IMAGES + 1}img"


def test_tiny_run_logs_and_plots_fid_across_a_resume_and_matches_fid_py(folder, model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gan_fid, "load_inception", lambda *args, **kwargs: model)
    monkeypatch.setattr(inception, "load_inception", lambda *args, **kwargs: model)  # fid.py's
    out = tmp_path / "run"
    assert train_gan.main(["--data", str(folder), "--out", str(out), "--epochs", "1", "--fid-every", "1",
                           *TINY_FLAGS]) == 0
    assert (out / "curves.png").is_file()

    # fid.py on the PNGs `--sample` writes from the epoch-1 checkpoint, against the cached statistics.
    fake = tmp_path / "fake"
    assert train_gan.main(["--sample", str(N_IMAGES), "--checkpoint", str(out / "checkpoint.safetensors"),
                           "--out", str(fake)]) == 0
    (stats,) = (tmp_path / "cache" / "fid_stats").glob("*.npz")
    capsys.readouterr()
    from_fid_py = fid.compute([str(stats), str(fake), "--dims", "64", "--device", "cpu"])["fid"]

    # The flags live in the checkpoint's settings: the resumed run keeps measuring without them.
    assert train_gan.main(["--resume", str(out / "checkpoint.safetensors"), "--epochs", "2", "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    fids = {r["epoch"]: r["metrics"]["fid"] for r in records if "metrics" in r}
    assert sorted(fids) == [1, 2]
    assert all(np.isfinite(v) and v > 0 for v in fids.values())
    assert fids[1] == pytest.approx(from_fid_py, rel=1e-9)  # the same images through the same code
    with Image.open(out / "curves.png") as curves:
        assert curves.size[1] > 3 * 300  # losses, D outputs, and the FID panel


def test_missing_weights_stop_before_training(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_gan, "train", lambda *a, **k: pytest.fail("training started without weights"))
    out = tmp_path / "run"
    assert train_gan.main(["--data", str(folder), "--out", str(out), "--epochs", "1", "--fid-every", "1",
                           *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "--fid-every needs the FID Inception weights" in err and "make fid-weights" in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [("--fid-dims", "100", "--fid-dims must be one of"),
                                                   ("--fid-samples", "1", "--fid-samples must be >= 2"),
                                                   ("--fid-every", "-1", "--fid-every must be")])
def test_bad_fid_flags_are_named(folder, tmp_path, capsys, flag, value, message):
    args = ["--data", str(folder), "--out", str(tmp_path), "--fid-every", "1", *TINY_FLAGS, flag, value]
    assert train_gan.main(args) == 2
    assert message in capsys.readouterr().err
