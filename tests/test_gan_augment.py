"""minigen.gan.augment (DiffAugment, Zhao et al. 2020): each transform against what it must do to known pixels, the
gradient reaching the input, the policy names, and the trainer calling it on both real and fake images."""

import pytest
import torch

from minigen.gan import augment
from minigen.gan.config import GANConfig
from minigen.gan.trainer import GANTrainer


def draws(n, seed=0):
    return augment.Randomness(torch.Generator().manual_seed(seed), n)


def test_translation_shifts_whole_images_and_fills_with_zeros():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16) + 1  # no zero pixel
    y = augment.translation(x, draws(len(x)))
    for image, moved in zip(x, y):
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)  # up to 16 / 8 = 2 pixels
                  if torch.equal(moved, torch.roll(image, (-dy, -dx), (1, 2)) * (moved != 0))]
        assert len(shifts) == 1
        dy, dx = shifts[0]
        zero_rows, zero_cols = (moved == 0).all(dim=(0, 2)).sum(), (moved == 0).all(dim=(0, 1)).sum()
        assert (zero_rows, zero_cols) == (abs(dy), abs(dx))  # what came in from outside is zero, nothing else


def test_translation_passes_gradients_to_the_pixels_it_keeps():
    x = torch.randn(50, 1, 8, 8, requires_grad=True)
    y = augment.translation(x, draws(len(x)))
    y.sum().backward()
    assert torch.all(x.grad <= 1) and x.grad.sum() == (y != 0).sum()  # each kept pixel read once, weight 1


def test_cutout_zeroes_one_half_size_square():
    x = torch.ones(300, 3, 16, 16)
    y = augment.cutout(x, draws(len(x)))
    assert torch.equal(y[:, 0], y[:, 2])  # the same square in every channel
    cut = (y[:, 0] == 0)  # (B, H, W)
    rows, cols = cut.any(dim=2).sum(dim=1), cut.any(dim=1).sum(dim=1)
    assert torch.equal(cut.sum(dim=(1, 2)), rows * cols)  # a rectangle
    assert rows.max() == 8 and cols.max() == 8 and rows.min() < 8  # half the side, clipped at the edges
    assert set(y.unique().tolist()) == {0.0, 1.0}


def test_color_keeps_a_grey_image_grey_and_is_per_image():
    grey = torch.full((50, 3, 4, 4), 0.2)
    y = augment.color(grey, draws(len(grey)))
    assert torch.allclose(y, y[:, :1].expand_as(y))  # saturation and contrast leave a flat grey image flat
    assert y[:, 0, 0, 0].std() > 0.2  # brightness: a different shift per image, U[-0.5, 0.5)


def test_policy_names_and_no_op():
    assert augment.parse_policy(" translation, cutout ") == ("translation", "cutout")
    x = torch.randn(2, 3, 8, 8)
    random = draws(2)
    state = random.generator.get_state()
    assert augment.diff_augment(x, "", random) is x
    assert torch.equal(random.generator.get_state(), state)  # no draw: runs without augmentation are unchanged
    with pytest.raises(ValueError, match="unknown transform 'flip'"):
        augment.parse_policy("translation,flip")
    with pytest.raises(ValueError, match="--diffaugment"):
        GANConfig(diffaugment="zoom")


def test_draws_for_a_global_batch_keep_this_ranks_rows():
    """Under torchrun a rank augments its rows of the global batch exactly as one process augments the whole batch."""
    x = torch.randn(6, 3, 16, 16)
    whole = augment.diff_augment(x, "color,translation,cutout", draws(6))
    second_half = augment.Randomness(torch.Generator().manual_seed(0), 6, lambda values: values[3:])
    torch.testing.assert_close(augment.diff_augment(x[3:], "color,translation,cutout", second_half), whole[3:])


def test_trainer_augments_what_the_discriminator_sees(monkeypatch):
    """Both D calls of D's update (reals, fakes) and the one of G's update go through the augmentation."""
    seen = []

    def recording(x, policy, random):
        seen.append((x.shape, policy))
        return x

    monkeypatch.setattr(augment, "diff_augment", recording)
    trainer = GANTrainer(GANConfig(size=(32, 32), ngf=4, ndf=4, nz=8, batch=4, diffaugment="cutout"))
    trainer.step(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert seen == [((4, 3, 32, 32), "cutout")] * 3
