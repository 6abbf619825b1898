"""minigen's FID Inception and metrics against pytorch-fid and torch-fidelity, with shared random weights."""

import numpy as np
import pytest
import torch
from PIL import Image

import pytorch_fid.inception as pf_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from minigen import metrics
from minigen.inception import OUTPUTS, FIDInceptionV3


def random_inception(seed=0) -> FIDInceptionV3:
    """Random weights scaled (He init, BN statistics near 1) so activations stay O(1) through all 94 layers."""
    torch.manual_seed(seed)
    model = FIDInceptionV3(classifier=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            torch.nn.init.normal_(m.weight, std=(2 / fan_in) ** 0.5)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.nn.init.normal_(model.fc.weight, std=0.05)
    torch.nn.init.normal_(model.fc.bias, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def models(monkeypatch_module):
    ours = random_inception()
    # pytorch-fid downloads its weights inside fid_inception_v3(); hand it our random ones instead.
    monkeypatch_module.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: ours.state_dict())
    # Channels-last makes the oracle ~3x faster on CPU without changing its math (up to float rounding).
    theirs = pf_inception.InceptionV3(output_blocks=(0, 1, 2, 3)).eval().to(memory_format=torch.channels_last)
    fc = pf_inception.fid_inception_v3().fc  # the classifier, which pytorch-fid's InceptionV3 wrapper drops
    return ours, theirs, fc


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_features_of_all_four_blocks_and_logits_match_pytorch_fid(models):
    ours, theirs, fc = models
    torch.manual_seed(1)
    images = torch.rand(2, 3, 120, 90)  # non-square, not 299: exercises the resize both sides do
    with torch.no_grad():
        maps = theirs(images)  # resizes to 299 and scales to [-1, 1] itself
        expected = {str(d): m.mean(dim=(2, 3)) for d, m in zip((64, 192, 768, 2048), maps)}
        expected["logits"] = fc(expected["2048"])
        got = ours(metrics.tensor_to_inception_input(images, "pytorch-fid"), OUTPUTS)
    for name, want in expected.items():
        scale = want.abs().max().item()
        assert scale > 1e-2, f"{name}: random weights gave vanishing activations; the test would prove nothing"
        # fp32 through up to 95 layers, same ops in the same order: agreement to ~1e-6 of the output's scale.
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-5 * scale, msg=name)
    torch.testing.assert_close(got["logits_unbiased"] + fc.bias, got["logits"])


def test_extract_features_from_files_matches_pytorch_fid_pipeline(models, tmp_path):
    """Decoding, batching and the resize of a folder of mixed-size images give pytorch-fid's activations."""
    from pytorch_fid.fid_score import get_activations

    ours, _, _ = models
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 48), (33, 70)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    files = sorted(p for p in tmp_path.glob("*.png") if p.name != "broken.png")
    # pytorch-fid stacks before resizing, so mixed sizes need batch size 1 there.
    pytorch_fid_2048 = pf_inception.InceptionV3([3]).eval().to(memory_format=torch.channels_last)  # our weights: the loader is patched by `models`
    want = get_activations(files, pytorch_fid_2048, batch_size=1, num_workers=0)
    with pytest.warns(UserWarning, match="unreadable"):
        got = metrics.extract_features(ours, tmp_path, batch_size=2, workers=2, progress=False)
    assert [p.name for p in got.skipped] == ["broken.png"]
    np.testing.assert_allclose(got["2048"], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_frechet_distance_matches_pytorch_fid():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 64)), rng.normal(0.3, 1.2, size=(400, 64)) @ rng.normal(size=(64, 64)) * 0.3
    mu1, s1 = metrics.statistics(a)
    mu2, s2 = metrics.statistics(b)
    np.testing.assert_array_equal(mu1, a.mean(0))
    np.testing.assert_array_equal(s1, np.cov(a, rowvar=False))
    # Same float64 algorithm (scipy sqrtm): equal to rounding.
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-10, abs=1e-10)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_eps_fallback_matches_pytorch_fid(monkeypatch):
    """When sqrtm(S1 S2) is not finite, both add eps to the diagonals and retry. Real singular products rarely make
    scipy's sqrtm return non-finite values, so the first sqrtm call of each is made to fail."""
    import scipy.linalg

    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def first_call_fails(a, **kwargs):
        calls.append(a)
        out = real_sqrtm(a)
        out = out * np.nan if len(calls) == 1 else out
        return (out, 0.0) if kwargs.get("disp") is False else out

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    rng = np.random.default_rng(1)
    with pytest.warns(UserWarning, match="at least 33 images"):
        mu1, s1 = metrics.statistics(rng.normal(size=(5, 32)))  # rank-4 covariance of 32 dims
    mu2, s2 = metrics.statistics(rng.normal(size=(50, 32)))
    with pytest.warns(UserWarning, match="adding 1e-06"):
        ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    calls.clear()
    assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-10)
    assert len(calls) == 2  # pytorch-fid took the same fallback


def test_frechet_distance_rejects_different_dims():
    with pytest.raises(ValueError, match="different dimensions.*--dims"):
        metrics.frechet_distance(np.zeros(64), np.eye(64), np.zeros(2048), np.eye(2048))


def test_kid_matches_torch_fidelity():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(120, 48)).astype(np.float32), rng.normal(0.1, 1, size=(150, 48)).astype(np.float32)
    want = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20, kid_subset_size=100,
                                  verbose=False)
    mean, std = metrics.kid(a, b, subsets=20, subset_size=100)
    # Same subsets (same RandomState draws), same float32 kernels: equal to float rounding.
    assert mean == pytest.approx(want["kernel_inception_distance_mean"], rel=1e-5)
    assert std == pytest.approx(want["kernel_inception_distance_std"], rel=1e-5)


def test_inception_score_matches_torch_fidelity():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(0, 3, size=(103, 1008)).astype(np.float32))
    want = isc_features_to_metric(logits)  # 10 splits, shuffle with seed 2020, float64
    mean, std = metrics.inception_score(logits)
    assert mean == pytest.approx(want["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(want["inception_score_std"], rel=1e-12)
