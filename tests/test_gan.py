"""minigen.gan.dcgan: shapes for square and non-square sizes, refused sizes, each loss against a hand computation,
and the gradient penalty against a direct per-sample autograd computation."""

import math

import pytest
import torch

from minigen.gan import dcgan


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


@pytest.mark.parametrize("size, base", [((64, 64), (4, 4, 4)), ((320, 480), (10, 15, 5)), ((32, 48), (4, 6, 3))])
def test_shapes(size, base):
    assert dcgan.stages_for(*size) == base
    G, D = dcgan.Generator(size, nz=8, ngf=4), dcgan.Discriminator(size, ndf=4)
    image = G(torch.randn(2, 8))
    assert image.shape == (2, 3, *size)
    assert image.abs().max() <= 1  # tanh output
    assert D(image).shape == (2,)
    n_transposed = sum(isinstance(m, torch.nn.ConvTranspose2d) for m in G.modules())
    assert n_transposed == base[2] + 1  # the base-grid projection, then one per stride-2 stage


@pytest.mark.parametrize("size", [(100, 100), (64, 66), (16, 16), (1024, 8)])
def test_unsupported_sizes_are_refused(size):
    with pytest.raises(ValueError, match="not supported"):
        dcgan.Generator(size)


def test_init_and_activations():
    G = dcgan.Generator((32, 32), nz=8, ngf=64, activation="leaky")
    convs = [m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002  # N(0, 0.02), 131k samples
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in G.modules())
    with pytest.raises(ValueError, match="activation"):
        dcgan.Generator((32, 32), activation="gelu")
    D = dcgan.Discriminator((32, 32), norm="layer")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules())


def test_spectral_norm_makes_every_layer_1_lipschitz():
    torch.manual_seed(0)
    D = dcgan.Discriminator((32, 32), ndf=4, norm="none", spectral_norm=True)
    for _ in range(30):  # each training-mode forward pass runs one power iteration per layer
        D(torch.randn(2, 3, 32, 32))
    convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4  # 3 stride-2 stages and the final base-grid convolution, all normalized
    for conv in convs:
        largest = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)  # (out, in * kh * kw)
        assert largest.item() == pytest.approx(1.0, rel=1e-3)
        original = torch.linalg.matrix_norm(conv.parametrizations.weight.original.detach().flatten(1), ord=2)
        assert original.item() < 0.9  # the DCGAN init (std 0.02) alone is far from it


def test_bce_losses_by_hand():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    real_t, fake_t = torch.tensor([0.9, 0.7]), torch.tensor([0.1, 0.0])

    def bce(logit, t):
        return -(t * math.log(sigmoid(logit)) + (1 - t) * math.log(1 - sigmoid(logit)))

    by_hand = (bce(2.0, 0.9) + bce(-1.0, 0.7)) / 2 + (bce(0.5, 0.1) + bce(-3.0, 0.0)) / 2
    assert dcgan.bce_d_loss(real, fake, real_t, fake_t).item() == pytest.approx(by_hand, rel=1e-6)
    assert dcgan.bce_g_loss(fake).item() == pytest.approx((-math.log(sigmoid(0.5)) - math.log(sigmoid(-3.0))) / 2,
                                                        rel=1e-6)


def test_wgan_and_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.5, -3.0, 1.5])
    assert dcgan.wgan_d_loss(real, fake).item() == pytest.approx((0.5 - 3.0 + 1.5) / 3 - (2.0 + 0.5 - 1.0) / 3)
    assert dcgan.wgan_g_loss(fake).item() == pytest.approx(-(0.5 - 3.0 + 1.5) / 3)
    # max(0, 1 - r): 0, 0.5, 2; max(0, 1 + f): 1.5, 0, 2.5
    assert dcgan.hinge_d_loss(real, fake).item() == pytest.approx((0 + 0.5 + 2) / 3 + (1.5 + 0 + 2.5) / 3)


def test_soft_labels_ranges():
    g = torch.Generator().manual_seed(0)
    t = dcgan.soft_labels(1000, 0.7, 1.0, generator=g)
    assert 0.7 <= t.min() and t.max() <= 1.0 and t.std() > 0.05
    assert torch.equal(dcgan.soft_labels(3, 1.0, 1.0), torch.ones(3))


def test_gradient_penalty_matches_direct_autograd():
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.Tanh(), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 4 * 4, 1), torch.nn.Flatten(0))
    real, fake = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    ours = dcgan.gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(5))

    e = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(5))  # the same mixing weights
    direct = 0.0
    for i in range(3):  # one sample at a time: its own gradient norm, no batching involved
        x = (e[i] * real[i] + (1 - e[i]) * fake[i])[None].requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x).sum(), x)
        direct += (grad.norm() - 1) ** 2 / 3
    assert ours.item() == pytest.approx(direct.item(), rel=1e-5)  # float32 sums in a different order
    # It is differentiable with respect to the critic's weights (create_graph), as training needs.
    ours.backward()
    assert critic[0].weight.grad is not None and critic[0].weight.grad.abs().sum() > 0


def test_gradient_penalty_of_a_linear_critic():
    w = torch.randn(3 * 4 * 4)
    critic = lambda x: x.flatten(1) @ w  # noqa: E731 - gradient is w everywhere
    gp = dcgan.gradient_penalty(critic, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)
