"""eval.py / minigen.evaluate.run on the tiny random SDXL with tiny LoRAs made here, and random FID Inception weights.

The proof of issue 8: the job runs end to end, the table has one row per model, every number equals what
minigen.fid.metrics gives on the written images when called directly, the base images equal sample.py's for the same
seeds, and a LoRA's images equal the pipeline's with that LoRA added directly. Random Inception weights suffice: the
claim is "the numbers are the pieces' numbers", not "the numbers are meaningful".
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_tiny import tiny_folder
from test_fid_parity import random_inception

import eval as eval_cli
import sample as sample_cli
import train_lora
from minigen.fid import features, metrics
from minigen.fid import inception as fid_inception
from minigen.evaluate.inputs import Settings, candidates, epoch_of, read_prompts
from minigen.evaluate.run import evaluate
from minigen.io import save_safetensors
from minigen.lora.layers import add_lora, lora_parameters, lora_weights
from minigen.sd.lora_files import LoRAFileError, save_lora
from minigen.sd.convert import unet_name_map
from minigen.sd.pipeline import Pipeline

PROMPTS = ["a red fox in snow", "a lighthouse at dusk, oil painting"]
SIZE, STEPS, CFG = 32, 2, 3.0  # guidance on, so the negative/positive batching is exercised
SETTINGS = Settings(steps=STEPS, guidance_scale=CFG, sampler="euler_a", height=SIZE, width=SIZE)  # ancestral: noise
# FID from 64-d features: a 2048x2048 sqrtm takes ~90 s here; the code path is the same for every --dims.
DIMS = 64
NUM, SEED = 2, 7  # per step from each image's generator, so a wrong generator shows


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def make_lora(path, seed, text=False, epoch=None):
    """A rank-2 kohya LoRA on the tiny UNet's attention (and text encoder 2's when `text`) with random weights."""
    sdxl = Pipeline.from_pretrained(tiny_folder()).model
    add_lora(sdxl.unet, "attention", rank=2, alpha=1.0)
    if text:
        add_lora(sdxl.text_encoder_2, "text", rank=2, alpha=1.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(sdxl.unet) + lora_parameters(sdxl.text_encoder_2):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora = {"unet": lora_weights(sdxl.unet)} | ({"te2": lora_weights(sdxl.text_encoder_2)} if text else {})
    save_lora(path, lora, "kohya", metadata={"ss_epoch": str(epoch)} if epoch else None,
              unet_names=unet_name_map(sdxl.unet.config))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # reference "style": smooth colour fields, 48x40 so the Inception resize differs from ours
        base = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        Image.fromarray(base).resize((48, 40), Image.BILINEAR).save(ref / f"{i}.png")
    run = root / "run"
    run.mkdir()
    make_lora(run / "style-000001.safetensors", seed=1)  # epoch from the name
    make_lora(run / "last.safetensors", seed=2, epoch=2)  # epoch from kohya's ss_epoch metadata
    text_lora = make_lora(root / "with_te.safetensors", seed=3, text=True)
    weights = root / "inception.safetensors"
    save_safetensors(random_inception().state_dict(), weights)
    return {"root": root, "prompts": root / "prompts.txt", "ref": ref, "run": run, "text_lora": text_lora,
            "weights": weights}


@pytest.fixture(scope="module")
def report(files):
    out = files["root"] / "out"
    code = eval_cli.main(["--model", str(tiny_folder()), "--lora", str(files["run"]),
                          "--lora", f"{files['text_lora']}:0.7", "--prompts", str(files["prompts"]),
                          "--ref", str(files["ref"]), "--num", str(NUM), "--seed", str(SEED),
                          "--steps", str(STEPS), "--cfg", str(CFG), "--sampler", "Euler a",  # A1111's name
                          "--height", str(SIZE), "--width", str(SIZE), "--batch-size", "3",
                          "--inception-weights", str(files["weights"]), "--dims", str(DIMS), "--is-splits", "2", "--out", str(out)])
    assert code == 0
    return json.loads((out / "results.json").read_text()), out


def images_of(out, model):
    return [np.asarray(Image.open(out / "images" / model / f"{p:03d}-{SEED + i}.png"))
            for p in range(len(PROMPTS)) for i in range(NUM)]


def test_one_row_per_model_and_all_outputs(report):
    rep, out = report
    assert [r["model"] for r in rep["rows"]] == ["base", "style-000001", "last", "with_te@0.7"]
    assert [r["epoch"] for r in rep["rows"]] == [None, 1, 2, None]
    assert [r["text_encoder_lora"] for r in rep["rows"]] == [False, False, False, True]
    table = (out / "results.md").read_text().splitlines()
    assert table[2].startswith("| base |") and table[6] == "" and table[-1] == f"2. {PROMPTS[1]}"
    for seed in (SEED, SEED + 1):  # rows: prompts, columns: models, under a header
        grid = Image.open(out / f"grid-seed{seed}.png")
        assert grid.size == (120 + 2 + 4 * (SIZE + 2), 18 + 2 + 2 * (SIZE + 2))  # 120 px of prompts on the left
    assert Image.open(out / "fid_per_epoch.png").size[0] > 100
    assert rep["prompts"] == PROMPTS and rep["seeds"] == [SEED, SEED + 1]


def test_base_images_equal_sample_py(report, tmp_path):
    """Image i of a prompt is `sample.py --seed SEED+i --num 1`, although eval batched 3 images of 2 prompts."""
    rep, out = report
    ours = images_of(out, "base")
    for p, i in ((0, 0), (1, 1)):  # first in the batch of 3; alone in the last batch
        prompt, folder = PROMPTS[p], tmp_path / f"{p}-{i}"
        assert sample_cli.main(["--model", str(tiny_folder()), "--prompt", prompt, "--seed", str(SEED + i),
                                "--steps", str(STEPS), "--cfg", str(CFG), "--sampler", "euler_ancestral",  # ComfyUI's
                                "--height", str(SIZE), "--width", str(SIZE), "--out", str(folder)]) == 0
        theirs = np.asarray(Image.open(folder / f"{SEED + i}-000.png"))
        # A batch of 3 and a batch of 1 may round differently in the last float bit (different matmul
        # blocking); that can flip a pixel that sits on a rounding boundary by one level, nothing more.
        diff = np.abs(ours[p * NUM + i].astype(int) - theirs.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # each image keeps its settings, as sample.py's do: --from-png redraws it
    image = out / "images" / "base" / f"001-{SEED + 1}.png"
    assert sample_cli.main(["--from-png", str(image), "--out", str(tmp_path / "redrawn")]) == 0
    redrawn = np.asarray(Image.open(tmp_path / "redrawn" / f"{SEED + 1}-000.png"))
    assert np.abs(redrawn.astype(int) - ours[1 * NUM + 1].astype(int)).max() <= 1


def test_lora_images_equal_the_pipeline_with_the_lora(report, files):
    """A text-encoder LoRA at 0.7: its prompts re-encoded with its encoders, its images the pipeline's own."""
    _, out = report
    pipe = Pipeline.from_pretrained(tiny_folder())
    pipe.add_lora(files["text_lora"], 0.7)
    expected = pipe(PROMPTS[1], steps=STEPS, guidance_scale=CFG, sampler="euler_a", height=SIZE, width=SIZE,
                    generator=torch.Generator("cpu").manual_seed(SEED + 1))[0].numpy()
    diff = np.abs(images_of(out, "with_te@0.7")[1 * NUM + 1].astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # batch-size rounding, as above


def test_numbers_equal_the_metrics_called_directly(report, files):
    rep, out = report
    net = fid_inception.load_inception(files["weights"])  # as eval.py loads it (batch norms folded in)
    ref = features.extract_features(net, files["ref"], ("64",), progress=False)["64"]
    ref_mu, ref_sigma = metrics.statistics(ref)
    base = images_of(out, "base")
    for row in rep["rows"]:
        images = images_of(out, row["model"])
        # In batches of 3 as eval measured them (it measures each generation batch), so the features are the same
        # bits: Inception in another batch size rounds differently, and IS's std near 1e-5 would show it.
        feats = features.extract_features(net, images, ("64", "logits_unbiased"), batch_size=3, progress=False)
        fid = metrics.frechet_distance(ref_mu, ref_sigma, *metrics.statistics(feats["64"]))
        kid, kid_std = metrics.kid(ref, feats["64"], subset_size=4)
        score, score_std = metrics.inception_score(feats["logits_unbiased"], splits=2)
        for name, value in (("fid", fid), ("kid", kid), ("kid_std", kid_std), ("is", score), ("is_std", score_std)):
            assert row[name] == pytest.approx(value, rel=1e-12, abs=1e-15), (row["model"], name)
        if row["model"] == "base":
            assert row.get("psnr_vs_base") is None
            continue
        psnr = np.mean([metrics.psnr(a, b) for a, b in zip(images, base)])
        ssim = np.mean([metrics.ssim(a, b) for a, b in zip(images, base)])
        assert row["psnr_vs_base"] == pytest.approx(psnr, rel=1e-12) and math.isfinite(psnr)
        assert row["ssim_vs_base"] == pytest.approx(ssim, rel=1e-12)


# --------------------------------------------------------------------------------- a train_lora.py run folder

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, files):
    """A real train_lora.py output folder: 2 epochs on the reference images with captions, on the random tiny SDXL
    (the architecture of tiny_folder(), so its LoRA files fit that model). It holds lora-epoch-0001/0002, lora (the
    final file, epoch 2 again) and the trainer's checkpoint.safetensors."""
    data = tmp_path_factory.mktemp("lora_data")
    for image in files["ref"].glob("*.png"):
        Image.open(image).save(data / image.name)
        (data / image.with_suffix(".txt").name).write_text("a smooth colour field")
    out = tmp_path_factory.mktemp("lora_runs") / "run"
    assert train_lora.main(["--model", "random:tiny", "--data", str(data), "--resolution", "16x16",
                            "--bucket-step", "16", "--batch", "4", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    return out


def test_run_folder_reads_its_lora_files_by_content(lora_run):
    assert (lora_run / "checkpoint.safetensors").is_file()
    with pytest.warns(UserWarning) as caught:
        rows = candidates([str(lora_run)])
    messages = " ".join(str(w.message) for w in caught)
    assert "skipping 1 file(s) that are not LoRA files: checkpoint.safetensors" in messages
    assert "lora.safetensors and lora-epoch-0002.safetensors both hold epoch 2" in messages
    assert [(r.name, r.epoch) for r in rows] == [("base", None), ("lora-epoch-0001", 1), ("lora-epoch-0002", 2)]


def test_lora_files_given_one_by_one_keep_their_epochs(lora_run):
    rows = candidates([str(lora_run / "lora.safetensors"), f"{lora_run / 'lora-epoch-0001.safetensors'}:0.5"])
    assert [(r.name, r.epoch) for r in rows] == [("base", None), ("lora", 2), ("lora-epoch-0001@0.5", 1)]
    with pytest.raises(LoRAFileError, match="checkpoint.safetensors"):  # named on its own: an error, not skipped
        candidates([str(lora_run / "checkpoint.safetensors")])


def test_eval_of_a_train_lora_run_folder(lora_run, files, tmp_path):
    """The README's `make eval LORA=runs/lora/` on a real run: a row per epoch and the FID-per-epoch plot."""
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="not LoRA files: checkpoint.safetensors"):
        code = eval_cli.main(["--model", str(tiny_folder()), "--lora", str(lora_run), "--prompts", str(files["prompts"]),
                              "--max-prompts", "1", "--ref", str(files["ref"]), "--num", "2", "--steps", "1",
                              "--height", str(SIZE), "--width", str(SIZE), "--inception-weights", str(files["weights"]),
                              "--dims", str(DIMS), "--is-splits", "2", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["model"], r["epoch"]) for r in rows] == [("base", None), ("lora-epoch-0001", 1), ("lora-epoch-0002", 2)]
    assert (out / "fid_per_epoch.png").is_file()


# ------------------------------------------------------------------------------------------------- bad input

def test_epoch_from_metadata_or_name(tmp_path, files):
    assert epoch_of(files["run"] / "last.safetensors") == 2
    assert epoch_of(files["run"] / "style-000001.safetensors") == 1
    for name, epoch in (("my_lora_epoch_12", 12), ("lora-epoch3-final", 3), ("style", None)):
        save_safetensors({"x": torch.zeros(1)}, tmp_path / f"{name}.safetensors")
        assert epoch_of(tmp_path / f"{name}.safetensors") == epoch


def run_evaluate(files, tmp_path, **kwargs):
    args = dict(loras=[], prompts=files["prompts"], reference=files["ref"], out=tmp_path / "out",
                settings=SETTINGS, inception_weights=files["weights"], dims=DIMS, is_splits=2, progress=False)
    return evaluate(str(tiny_folder()), **(args | kwargs))


def test_empty_prompt_file_is_refused(files, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts in .*empty.txt"):
        read_prompts(tmp_path / "empty.txt")
    assert eval_cli.main(["--model", str(tiny_folder()), "--prompts", str(tmp_path / "empty.txt"),
                          "--ref", str(files["ref"])]) == 2


def test_prompts_from_dataset_captions(tmp_path):
    for i, caption in enumerate(["a cat", "", "a dog"]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption + "\n")
    assert read_prompts(tmp_path) == ["a cat", "a dog"]
    assert read_prompts(tmp_path, limit=1) == ["a cat"]


def test_lora_for_another_model_is_refused_before_generating(files, tmp_path):
    other = tmp_path / "sd15.safetensors"  # a UNet LoRA whose layer names and widths are not this model's
    save_safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320),
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2),
                      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}, other)
    with pytest.raises(LoRAFileError, match="sd15.safetensors.*another model"):
        run_evaluate(files, tmp_path, loras=[str(other)])
    assert not (tmp_path / "out").exists()


def test_run_folder_without_checkpoints_is_refused(files, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("training crashed")
    with pytest.raises(FileNotFoundError, match="run folder .*run has no LoRA files"):
        run_evaluate(files, tmp_path, loras=[str(tmp_path / "run")])
    with pytest.raises(FileNotFoundError, match="LoRA file or run folder not found"):
        run_evaluate(files, tmp_path, loras=[str(tmp_path / "missing.safetensors")])


def test_small_reference_folder_warns_with_the_number_needed(files, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (16, 16), "red").save(one / "a.png")
    with pytest.raises(ValueError, match="at least 2 images in each set; got 1 reference"):
        run_evaluate(files, tmp_path, reference=one)
    # Enough to compute, too few to trust: a warning naming the number needed (a small run: base only, 2 images).
    with pytest.warns(UserWarning, match="needs at least 65 of each") as caught:
        run_evaluate(files, tmp_path, max_prompts=1, num_images=2)
    assert any("KID subsets of 2 images instead of 1000" in str(w.message) for w in caught)


def test_pipeline_refuses_embeddings_of_the_wrong_batch():
    pipe = Pipeline.from_pretrained(tiny_folder())
    context, pooled = pipe.conditioning("a cat", None, 1, guidance=True)  # 2 rows: negative, positive
    with pytest.raises(ValueError, match="embeddings of 2 rows do not fit 2 images with guidance"):
        pipe(None, num_images=2, steps=1, height=SIZE, width=SIZE, embeddings=(context, pooled))
