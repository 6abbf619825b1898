"""train_gan.py and minigen.gan.trainer on a tiny generated folder: outputs, exact resume (epoch boundary and
Ctrl-C mid-epoch, also with the EMA generator and spectral norm), the EMA update by hand, NaN stop keeping the last
checkpoint, bad checkpoints, sampling (from the EMA generator when there is one), presets."""

import json
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import train_gan
from minigen import speed
from minigen.gan import dcgan
from minigen.gan.config import GANConfig
from minigen.gan.trainer import GANTrainer, TrainingDiverged, load_generator, train
from minigen.io import load_safetensors, read_header, save_safetensors

TINY = ["--size", "32x32", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch", "4", "--grid", "4", "--quiet"]
# The averaged generator and a spectrally normalized D: their state (G_ema, the power iterations' vectors) must resume.
EMA_SN = ["--ema-halflife", "2", "--spectral-norm"]
VARIANTS = {"plain": [], "ema-sn": EMA_SN}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 small random pictures: 3 iterations per epoch at batch 4."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def run(folder, out, *extra):
    return train_gan.main(["--data", str(folder), "--out", str(out), *TINY, *extra])


def log_lines(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert run(folder, out, "--epochs", "3") == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted_ema_sn(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full-ema-sn")
    assert run(folder, out, "--epochs", "3", *EMA_SN) == 0
    return out


def reference_run(request, variant):
    return request.getfixturevalue("uninterrupted" if variant == "plain" else "uninterrupted_ema_sn")


def test_two_epoch_run_leaves_grid_curve_log_checkpoint(folder, tmp_path):
    hook_calls = []

    def fake_metric(trainer):  # stands in for FID during training
        hook_calls.append(trainer.epoch)
        return {"fake_fid": 100.0 / trainer.epoch}

    cfg = GANConfig(data=str(folder), size=(32, 32), ngf=4, ndf=4, nz=8, batch=4, grid=4, epochs=2, out=str(tmp_path))
    assert train(cfg, epoch_hooks=[fake_metric], progress=False) == "done"
    for epoch in (1, 2):
        with Image.open(tmp_path / "samples" / f"epoch_{epoch:04d}.png") as grid:
            assert grid.size == (2 + 2 * 34, 2 + 2 * 34)  # 4 images of 32x32 in 2 rows, 2 px apart
    with Image.open(tmp_path / "curves.png") as curves:
        assert curves.size[1] > 3 * 300  # losses, D outputs, and the per-epoch metrics panel
    records = log_lines(tmp_path)
    iterations = [r for r in records if "loss_d" in r]
    assert [r["iteration"] for r in iterations] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["d_real"] < 1 and np.isfinite(r["loss_g"]) for r in iterations)
    assert [r["metrics"] for r in records if "metrics" in r] == [{"fake_fid": 100.0}, {"fake_fid": 50.0}]
    assert hook_calls == [1, 2]
    tensors, meta = load_safetensors(tmp_path / "checkpoint.safetensors")
    assert meta["epoch"] == "2" and meta["iteration"] == "6"
    assert {"rng", "fixed_noise", "opt_g.0.exp_avg", "opt_d.0.step", "G.net.0.weight"} <= set(tensors)


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_equals_uninterrupted(folder, tmp_path, request, variant):
    uninterrupted = reference_run(request, variant)
    assert run(folder, tmp_path, "--epochs", "2", *VARIANTS[variant]) == 0
    assert train_gan.main(["--resume", str(tmp_path / "checkpoint.safetensors"), "--epochs", "3", "--quiet"]) == 0
    assert log_lines(tmp_path) == log_lines(uninterrupted)  # every loss, D output and lr, bit for bit
    ours, _ = load_safetensors(tmp_path / "checkpoint.safetensors")
    theirs, _ = load_safetensors(uninterrupted / "checkpoint.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for grid in ("epoch_0002.png", "epoch_0003.png"):  # drawn from G_ema in the EMA variant
        assert (tmp_path / "samples" / grid).read_bytes() == (uninterrupted / "samples" / grid).read_bytes()
    if variant == "ema-sn":
        assert {"G_ema.net.0.weight", "D.net.0.parametrizations.weight.0._u"} <= ours.keys()
        assert not torch.equal(ours["G_ema.net.0.weight"], ours["G.net.0.weight"])


def test_ema_update_by_hand(folder):
    """G_ema <- beta G_ema + (1 - beta) G after each generator step, beta = 0.5 ** (1 / half-life)."""
    cfg = GANConfig(data=str(folder), size=(32, 32), ngf=4, ndf=4, nz=8, batch=4, ema_halflife=3.0)
    trainer = GANTrainer(cfg)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    averages = [p.clone() for p in trainer.G_ema.parameters()]  # the initial G
    beta = 0.5 ** (1 / 3.0)
    for _ in range(5):
        trainer.step(real)
        averages = [beta * a + (1 - beta) * p for a, p in zip(averages, trainer.G.parameters())]
        for ours, expected in zip(trainer.G_ema.parameters(), averages):
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(trainer.G_ema.net[1].running_mean, trainer.G.net[1].running_mean)  # buffers copied
    with torch.no_grad():
        z = torch.randn(4, 8)
        assert torch.equal(trainer.generate(z), trainer.G_ema(z))  # the grids come from the average
    assert GANTrainer(GANConfig(data=str(folder))).G_ema is None  # off by default


# Iteration 5 is in the middle of epoch 2; iteration 3 is the last of epoch 1, before its grid and checkpoint.
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("at, position", [(5, ("5", "1", "2")), (3, ("3", "0", "3"))])
def test_ctrl_c_saves_then_resumes_exactly(folder, tmp_path, request, monkeypatch, at, position, variant):
    uninterrupted = reference_run(request, variant)
    calls = {"n": 0}
    real_loss = dcgan.bce_d_loss

    def interrupting_loss(*args):
        calls["n"] += 1
        if calls["n"] == at:
            signal.raise_signal(signal.SIGINT)
        return real_loss(*args)

    monkeypatch.setattr(dcgan, "bce_d_loss", interrupting_loss)
    assert run(folder, tmp_path, "--epochs", "3", *VARIANTS[variant]) == 130
    _, meta = read_header(tmp_path / "checkpoint.safetensors")
    assert (meta["iteration"], meta["epoch"], meta["batch_index"]) == position  # epoch counts from 0 here
    monkeypatch.setattr(dcgan, "bce_d_loss", real_loss)
    assert train_gan.main(["--resume", str(tmp_path / "checkpoint.safetensors"), "--quiet"]) == 0
    assert log_lines(tmp_path) == log_lines(uninterrupted)


def test_nan_loss_stops_and_keeps_last_checkpoint(folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = dcgan.bce_d_loss

    def diverging_loss(*args):
        calls["n"] += 1
        return real_loss(*args) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr(dcgan, "bce_d_loss", diverging_loss)
    cfg = GANConfig(data=str(folder), size=(32, 32), ngf=4, ndf=4, nz=8, batch=4, grid=4, epochs=3, out=str(tmp_path))
    with pytest.raises(TrainingDiverged, match="iteration 5.*last good checkpoint"):
        train(cfg, progress=False)
    _, meta = read_header(tmp_path / "checkpoint.safetensors")
    assert meta["iteration"] == "3"  # written after epoch 1, untouched by the failed epoch 2


def test_bad_checkpoints_are_named(folder, tmp_path, uninterrupted, capsys):
    data = (uninterrupted / "checkpoint.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    assert train_gan.main(["--resume", str(tmp_path / "cut.safetensors")]) == 2
    assert "truncated" in capsys.readouterr().err
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    assert train_gan.main(["--resume", str(tmp_path / "other.safetensors")]) == 2
    assert "not a minigen DCGAN checkpoint" in capsys.readouterr().err
    assert run(folder, tmp_path / "x", "--size", "100x100") == 2
    assert "not supported" in capsys.readouterr().err


def test_sample_writes_pngs(tmp_path, uninterrupted):
    ckpt = str(uninterrupted / "checkpoint.safetensors")
    assert train_gan.main(["--sample", "5", "--checkpoint", ckpt, "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    with Image.open(files[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"


def test_sample_uses_the_ema_generator(uninterrupted_ema_sn):
    ckpt = uninterrupted_ema_sn / "checkpoint.safetensors"
    tensors, _ = load_safetensors(ckpt)
    G, cfg = load_generator(ckpt)
    assert cfg.ema_halflife == 2 and cfg.spectral_norm and cfg.d_norm == "none"  # auto: no feature norm with SN
    assert all(torch.equal(v, tensors[f"G_ema.{k}"]) for k, v in G.state_dict().items())


def test_presets_reproduce_the_seeds():
    def preset(name, *extra):
        return train_gan.parse(["--config", f"configs/{name}.conf", *extra])[1]

    v1, v2, v3 = preset("gan_002_v1"), preset("gan_002_v2"), preset("gan_002_v3")
    for cfg in (v1, v2, v3):
        assert (cfg.size, cfg.batch, cfg.lr, cfg.betas[0], cfg.optimizer, cfg.loss) == ((64, 64), 128, 5e-4, 0.5,
                                                                                          "adam", "bce")
    assert (v1.epochs, v1.g_act, v1.real_label) == (300, "relu", (1.0, 1.0))
    assert (v2.epochs, v2.g_act, v2.real_label, v2.fake_label) == (100, "leaky", (0.7, 1.0), (0.0, 0.3))
    assert (v3.epochs, v3.g_act, v3.real_label, v3.fake_label) == (400, "relu", (0.7, 1.0), (0.0, 0.3))
    s0 = preset("gan_000")
    assert (s0.size, s0.optimizer, s0.lr, s0.batch, s0.decay_steps, s0.decay_rate, s0.eps, s0.epochs) == (
        (320, 480), "rmsprop", 1e-4, 16, 1000, 0.95, 1e-7, 500)
    assert preset("gan_002_v3", "--epochs", "7", "--lr", "1e-3").epochs == 7  # the command line wins


def test_log_records_both_learning_rates(folder, tmp_path):
    """lr_g and lr_d per iteration, each its own network's rate, decayed: lr * rate ** (updates before / steps)."""
    assert run(folder, tmp_path, "--epochs", "1", "--lr", "1e-3", "--lr-d", "2e-4", "--decay-steps", "2",
               "--decay-rate", "0.5") == 0
    records = log_lines(tmp_path)
    assert [(r["lr_g"], r["lr_d"]) for r in records] == [
        pytest.approx((1e-3 * 0.5 ** (i / 2), 2e-4 * 0.5 ** (i / 2))) for i in range(3)]


def test_a_fresh_run_into_a_used_out_folder_is_refused_unless_overwrite(folder, tmp_path, capsys):
    assert run(folder, tmp_path, "--epochs", "2") == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert run(folder, tmp_path, "--epochs", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err
    assert f"--resume {tmp_path / 'checkpoint.safetensors'} continues it, --overwrite replaces it" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched
    (tmp_path / "notes.txt").write_text("mine")
    assert train_gan.main(["--sample", "2", "--checkpoint", str(tmp_path / "checkpoint.safetensors"),
                           "--out", str(tmp_path / "fake")]) == 0  # what `make gan-sample` draws for fid.py
    assert run(folder, tmp_path, "--epochs", "1", "--overwrite") == 0
    assert "replacing the previous run in" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch_0001.png"]  # epoch 2's grid is gone
    assert list((tmp_path / "fake").iterdir()) == []  # so are the old run's samples: an FID would measure them
    assert [r["epoch"] for r in log_lines(tmp_path)] == [1, 1, 1] and (tmp_path / "notes.txt").read_text() == "mine"
    assert train_gan.main(["--resume", str(tmp_path / "checkpoint.safetensors"), "--epochs", "2", "--quiet"]) == 0


def test_resuming_a_finished_run_without_more_epochs_is_refused(uninterrupted, capsys):
    """--epochs is the total: the README's `--resume ... --epochs 30` after 48 epochs used to print "epochs 49..30",
    train nothing and exit 0. It is one line naming the epochs done and how to train more, and nothing changes."""
    checkpoint = uninterrupted / "checkpoint.safetensors"
    before = checkpoint.read_bytes()
    for epochs in ("2", "3"):
        assert train_gan.main(["--resume", str(checkpoint), "--epochs", epochs, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--epochs {epochs}" in err and "has trained 3 epochs" in err and "--epochs 33" in err
    assert checkpoint.read_bytes() == before


def test_the_speed_line_shows_a_presets_channels_last(folder, tmp_path, capsys):
    (tmp_path / "cl.conf").write_text("--channels-last\n")
    assert run(folder, tmp_path / "run", "--config", str(tmp_path / "cl.conf"), "--epochs", "1") == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("speed:"))
    assert "channels-last on" in line


def test_a_presets_other_flags_apply_under_the_command_line(tmp_path):
    """Speed switches and --threads in a preset are not GANConfig fields: they reach the flags given, and the
    command line still wins; --resume and --config in a preset are refused (they name runs, not settings)."""
    preset = tmp_path / "fast.conf"
    preset.write_text("--epochs 3 --threads 1 --compile --no-tf32\n")
    args, cfg = train_gan.parse(["--config", str(preset), "--tf32"])
    assert cfg.epochs == 3 and args.threads == 1
    assert speed.speed_from_args(args) == speed.Speed(compile=True, tf32=True)
    for line in ("--resume run/checkpoint.safetensors", f"--config {preset}"):
        (tmp_path / "bad.conf").write_text(line + "\n")
        with pytest.raises(ValueError, match="belongs on the command line"):
            train_gan.parse(["--config", str(tmp_path / "bad.conf")])
