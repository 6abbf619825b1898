"""minigen's FID Inception and metrics against pytorch-fid and torch-fidelity, with shared random weights."""

import numpy as np
import pytest
import torch
from PIL import Image

import pytorch_fid.inception as pf_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from minigen.fid import features, metrics
from minigen.fid.inception import OUTPUTS, FIDInceptionV3


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
    state = {k: v.clone() for k, v in ours.state_dict().items()}  # with the BatchNorms, as pytorch-fid's file has them
    # pytorch-fid downloads its weights inside fid_inception_v3(); hand it our random ones instead.
    monkeypatch_module.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state)
    ours.fold_batch_norms()  # as load_inception serves the network: every comparison below covers the folding
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
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
        got = ours(features.tensor_to_inception_input(images, "pytorch-fid"), OUTPUTS)
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
        got = features.extract_features(ours, tmp_path, batch_size=2, workers=2, progress=False)
    assert [p.name for p in got.skipped] == ["broken.png"]
    np.testing.assert_allclose(got["2048"], want, rtol=0, atol=1e-5 * np.abs(want).max())


def gaussian_statistics(rng, n: int, d: int, shift: float = 0.0):
    """mu (d,), sigma (d, d) of n correlated samples: rank n - 1 when n <= d (too few images: a singular covariance)."""
    x = rng.normal(shift, 1.0, size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_pytorch_fid():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 64)), rng.normal(0.3, 1.2, size=(400, 64)) @ rng.normal(size=(64, 64)) * 0.3
    mu1, s1 = metrics.statistics(a)
    mu2, s2 = metrics.statistics(b)
    np.testing.assert_array_equal(mu1, a.mean(0))
    np.testing.assert_array_equal(s1, np.cov(a, rowvar=False))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


# (images in set 1, in set 2, dims): full rank; one or both covariances rank-deficient (fewer images than dims).
@pytest.mark.parametrize("n1, n2, dims", [(500, 400, 64), (40, 400, 64), (30, 20, 64), (900, 700, 256),
                                          (100, 700, 256), (120, 90, 256)],
                         ids=["64-full", "64-one-singular", "64-both-singular", "256-full", "256-one-singular",
                              "256-both-singular"])
def test_symmetric_eigen_frechet_equals_pytorch_fid_sqrtm(n1, n2, dims):
    """The symmetric eigendecomposition gives pytorch-fid's scipy-sqrtm value to 1e-6 relative, singular or not."""
    rng = np.random.default_rng(dims + n1)
    mu1, s1 = gaussian_statistics(rng, n1, dims)
    mu2, s2 = gaussian_statistics(rng, n2, dims, shift=0.2)
    theirs = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs, rel=1e-6)


def test_trace_sqrt_product_of_commuting_matrices():
    """Diagonal covariances commute: sqrt(S1 S2) = diag(sqrt(a_i b_i)), a zero variance included."""
    a, b = np.array([4.0, 1.0, 0.0, 2.0]), np.array([1.0, 9.0, 5.0, 8.0])
    assert metrics.trace_sqrt_product(np.diag(a), np.diag(b)) == pytest.approx(2 + 3 + 0 + 4, rel=1e-12)


def test_frechet_distance_says_what_it_is_doing(capsys):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.ones(3), np.eye(3), progress=True)
    assert capsys.readouterr().err.startswith("Fréchet distance (3-d)... ")


@pytest.mark.parametrize("mu, sigma, message", [
    (np.array([0.0, np.nan]), np.eye(2), "mu holds 1 NaN or inf"),
    (np.zeros(2), np.array([[1.0, np.inf], [np.inf, 1.0]]), "sigma holds 2 NaN or inf"),
    (np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), "not symmetric"),
    (np.array([1e200, 0.0]), np.eye(2), "distance is inf"),
], ids=["nan-mu", "inf-sigma", "asymmetric-sigma", "overflow"])
def test_frechet_distance_refuses_non_finite_statistics(mu, sigma, message):
    """Never a NaN FID: non-finite statistics, or a result too large for float64, are errors."""
    with pytest.raises(ValueError, match=message):
        metrics.frechet_distance(mu, sigma, np.zeros(2), np.eye(2))


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
