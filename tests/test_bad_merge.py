"""merge.py under bad input and faults: a corpus of bad files, bad flags, OS errors and outputs over inputs that the
tests build, each ending in one `merge.py: error: ...` line naming the file or flag, exit 2, the inputs byte-identical
and nothing new on disk; and `kill -9` at random moments and around the final rename leaving nothing, the previous
output or a complete new one."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge as merge_cli  # merge.py at the repository root (pytest's pythonpath)
from cli_errors import assert_clean_error
from corpus import fails_cleanly, snapshot
from minigen.io import save_safetensors

REPO = Path(__file__).resolve().parent.parent
UNET_Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
UNET_NORM = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight"
TE1_Q = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
BIGG_QKV = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
VAE = "first_stage_model.decoder.conv_in.weight"
POS_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
SHAPES = {UNET_Q: (8, 8), UNET_NORM: (8,), TE1_Q: (6, 6), BIGG_QKV: (12, 4), VAE: (4, 4, 3, 3)}
LORA_LAYER = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"


def checkpoint(path: Path, seed: int, dtype=torch.float16, poison: str | None = None, value=float("nan")) -> Path:
    """A tiny SDXL-like single file (UNet attention and norm, both text encoders, VAE, integer ids); `poison`: a key
    whose first element is `value`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(shape, generator=g).to(dtype) for k, shape in SHAPES.items()}
    tensors[POS_IDS] = torch.arange(5).reshape(1, 5)
    if poison:
        tensors[poison].view(-1)[0] = value
    save_safetensors(tensors, path)
    return path


def kohya_lora(path: Path, seed: int, rank: int = 2, up_rank: int | None = None, value: float | None = None,
               alpha: float = 1.0) -> Path:
    """A kohya LoRA on UNET_Q; `up_rank` makes up's rank differ from down's, `value` sets down's first entry."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, 8, generator=g)
    if value is not None:
        down[0, 0] = value
    save_safetensors({f"{LORA_LAYER}.lora_down.weight": down,
                      f"{LORA_LAYER}.lora_up.weight": torch.randn(8, up_rank or rank, generator=g),
                      f"{LORA_LAYER}.alpha": torch.tensor(alpha)}, path)
    return path


def lycoris_layer(path: Path, **parts: tuple[int, ...]) -> Path:
    """A one-layer LyCORIS-style file on UNET_Q with random parts of these shapes (suffix: shape)."""
    g = torch.Generator().manual_seed(0)
    save_safetensors({f"{LORA_LAYER}.{part}": torch.randn(shape, generator=g) for part, shape in parts.items()}, path)
    return path


def split(path: Path) -> tuple[dict, bytes]:
    """(header as a dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: bytes | object, data: bytes = b"") -> Path:
    """A safetensors file of this header (JSON-encoded unless already bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


class Corpus:
    """The good inputs of every mode in one folder, and builders of bad ones beside them."""

    def __init__(self, root: Path):
        self.root = root
        self.a, self.b, self.c = (checkpoint(root / f"{n}.safetensors", i) for i, n in enumerate("abc"))
        self.vae = root / "vae.safetensors"
        save_safetensors({"decoder.conv_in.weight": torch.randn(4, 4, 3, 3).half()}, self.vae)
        self.l, self.m = kohya_lora(root / "l.safetensors", 1), kohya_lora(root / "m.safetensors", 2)
        self.out = root / "out.safetensors"

    def bad_header(self, mutate, name: str = "bad.safetensors") -> Path:
        """B's bytes with its header changed by mutate(header) (which may return a replacement)."""
        header, data = split(self.b)
        replacement = mutate(header)
        header = header if replacement is None else replacement
        return write_raw(self.root / name, header, data)

    def entry(self, change: dict) -> Path:
        """B with UNET_Q's header entry updated by `change` (None values delete the field)."""
        def mutate(header):
            header[UNET_Q].update(change)
            header[UNET_Q] = {k: v for k, v in header[UNET_Q].items() if v is not None}
        return self.bad_header(mutate)

    def bytes_of(self, data: bytes, name: str = "bad.safetensors") -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def folder(self, name: str = "folder", *files: str) -> Path:
        path = self.root / name
        path.mkdir()
        for file in files:
            (path / file).write_text("mine")
        return path

    def symlink(self, target: Path, name: str = "link.safetensors") -> Path:
        (self.root / name).symlink_to(target)
        return self.root / name

    def hardlink(self, target: Path, name: str = "hard.safetensors") -> Path:
        os.link(target, self.root / name)
        return self.root / name

    def merge(self, b: Path, *flags: str) -> list[str]:
        return [str(self.a), str(b), "-o", str(self.out), *flags]

    def bake(self, lora: str, *flags: str) -> list[str]:
        return [str(self.a), "--lora", lora, "-o", str(self.out), *flags]


def _overlap(header):
    first, second = header[UNET_Q]["data_offsets"], header[TE1_Q]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first[0], first[0] + size]  # TE1_Q's bytes inside UNET_Q's


def _duplicate_name(c: Corpus) -> Path:
    header, data = split(c.b)
    text = json.dumps(header)
    entry = json.dumps({UNET_Q: header[UNET_Q]})[1:-1]
    return write_raw(c.root / "bad.safetensors", (text[:-1] + ", " + entry + "}").encode(), data)


def _truncated(c: Corpus) -> Path:
    return c.bytes_of(c.b.read_bytes()[:-7])


def _pickle(c: Corpus, obj, name: str = "model.ckpt") -> Path:
    torch.save(obj, c.root / name)
    return c.root / name


def _sd1(c: Corpus) -> Path:
    save_safetensors({"model.diffusion_model.time_embed.0.weight": torch.zeros(8, 4),
                      "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(6)},
                     c.root / "sd1.safetensors")
    return c.root / "sd1.safetensors"


def _peft_lora(c: Corpus) -> Path:
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_safetensors({f"{name}.lora_A.weight": torch.randn(2, 8), f"{name}.lora_B.weight": torch.randn(8, 2)},
                     c.root / "peft.safetensors")
    return c.root / "peft.safetensors"


# Each case: corpus -> (argv, things the error line must name). Grouped by cause; ids say what is wrong.
HEADER_CASES = {
    "header-is-a-list": lambda c: c.bad_header(lambda h: [1, 2]),
    "header-is-a-string": lambda c: c.bad_header(lambda h: "weights"),
    "entry-not-an-object": lambda c: c.bad_header(lambda h: h.update({UNET_Q: 5})),
    "entry-is-a-list": lambda c: c.bad_header(lambda h: h.update({UNET_Q: [0, 256]})),
    "missing-data-offsets": lambda c: c.entry({"data_offsets": None}),
    "missing-dtype": lambda c: c.entry({"dtype": None}),
    "missing-shape": lambda c: c.entry({"shape": None}),
    "unknown-dtype": lambda c: c.entry({"dtype": "F17"}),
    "dtype-not-a-string": lambda c: c.entry({"dtype": 16}),
    "shape-a-string": lambda c: c.entry({"shape": "8x8"}),
    "shape-negative": lambda c: c.entry({"shape": [-8, -8]}),
    "shape-floats": lambda c: c.entry({"shape": [8.0, 8.0]}),
    "shape-bools": lambda c: c.entry({"shape": [True, 64]}),
    "shape-larger-than-bytes": lambda c: c.entry({"shape": [800, 8]}),
    "shape-smaller-than-bytes": lambda c: c.entry({"shape": [4, 8]}),
    "wrong-dtype-size": lambda c: c.entry({"dtype": "F32"}),
    "offsets-one-number": lambda c: c.entry({"data_offsets": [0]}),
    "offsets-reversed": lambda c: c.entry({"data_offsets": [128, 0]}),
    "offsets-strings": lambda c: c.entry({"data_offsets": ["0", "128"]}),
    "offsets-negative": lambda c: c.entry({"data_offsets": [-128, 0]}),
    "offsets-past-the-data": lambda c: c.entry({"data_offsets": [10**6, 10**6 + 128]}),
    "offsets-overlap": lambda c: c.bad_header(_overlap),
    "duplicate-tensor-name": _duplicate_name,
    "metadata-a-list": lambda c: c.bad_header(lambda h: h.update({"__metadata__": ["a"]})),
    "metadata-value-a-number": lambda c: c.bad_header(lambda h: h.update({"__metadata__": {"a": 1}})),
    "header-not-json": lambda c: write_raw(c.root / "bad.safetensors", b"{not json", b""),
    "header-not-utf8": lambda c: write_raw(c.root / "bad.safetensors", b'{"\xff\xfe": 1}', b""),
    "header-length-past-the-end": lambda c: c.bytes_of(struct.pack("<Q", 10**6) + b"{}"),
    "header-length-huge": lambda c: c.bytes_of(struct.pack("<Q", 2**63) + b"{}"),
    "truncated-data": _truncated,
    "truncated-length-field": lambda c: c.bytes_of(b"\x10\x00\x00"),
    "empty-file": lambda c: c.bytes_of(b""),
}
CASES = {f"merge-b-{name}": (lambda make: lambda c: (c.merge(make(c)), ["bad.safetensors"]))(make)
         for name, make in HEADER_CASES.items()}
CASES |= {
    # the same validator behind every reader: A, C, the VAE file, LoRA files, extraction inputs
    "merge-a-unknown-dtype": lambda c: ([str(c.entry({"dtype": "Q8"})), str(c.b), "-o", str(c.out)],
                                        ["bad.safetensors", UNET_Q, "Q8"]),
    "add-difference-c-overlap": lambda c: (c.merge(c.b, "--c", str(c.bad_header(_overlap)), "--method",
                                                   "add_difference"), ["bad.safetensors", "overlap"]),
    "vae-file-header-a-list": lambda c: (c.merge(c.b, "--vae", str(c.bad_header(lambda h: []))),
                                         ["bad.safetensors"]),
    "bake-lora-truncated": lambda c: (c.bake(str(c.bytes_of(c.l.read_bytes()[:-3]))), ["bad.safetensors"]),
    "bake-lora-unknown-dtype": lambda c: (c.bake(str(write_raw(c.root / "bad.safetensors", {
        f"{LORA_LAYER}.alpha": {"dtype": "X", "shape": [], "data_offsets": [0, 4]}}, b"\0" * 4))),
        ["bad.safetensors", "alpha"]),
    "lora-merge-header-a-list": lambda c: (["--lora", str(c.l), "--lora", str(write_raw(c.root / "bad.safetensors",
                                                                                         [])), "--rank", "2", "-o",
                                            str(c.out)], ["bad.safetensors"]),
    "extract-tuned-missing-offsets": lambda c: ([str(c.a), str(c.entry({"data_offsets": None})), "--rank", "2",
                                                 "-o", str(c.out)], ["bad.safetensors", UNET_Q]),
    # NaN and infinity in inputs, LoRAs and results
    "merge-b-nan": lambda c: (c.merge(checkpoint(c.root / "nan.safetensors", 5, poison=UNET_Q)),
                              ["nan.safetensors", UNET_Q, "NaN"]),
    "merge-a-nan-in-copied-vae": lambda c: ([str(checkpoint(c.root / "nan.safetensors", 5, poison=VAE)), str(c.b),
                                             "-o", str(c.out)], ["nan.safetensors", VAE]),
    "add-difference-c-nan": lambda c: (c.merge(c.b, "--c", str(checkpoint(c.root / "nan.safetensors", 5,
                                                                           poison=TE1_Q)),
                                               "--method", "add_difference"), ["nan.safetensors", TE1_Q]),
    "merge-b-fp32-inf": lambda c: (c.merge(checkpoint(c.root / "inf.safetensors", 5, torch.float32, poison=UNET_NORM,
                                                      value=float("-inf"))), ["inf.safetensors", UNET_NORM]),
    "merge-overflows-fp16": lambda c: (c.merge(c.b, "--alpha", "1e6"), ["out.safetensors", "overflow"]),
    "bake-lora-nan": lambda c: (c.bake(str(kohya_lora(c.root / "nan.safetensors", 3, value=float("nan")))),
                                ["nan.safetensors", "input_blocks_1_1", "down", "NaN"]),
    "bake-lora-inf": lambda c: (c.bake(str(kohya_lora(c.root / "inf.safetensors", 3, value=float("inf")))),
                                ["inf.safetensors"]),
    "bake-lora-alpha-nan": lambda c: (c.bake(str(kohya_lora(c.root / "nan.safetensors", 3, alpha=float("nan")))),
                                      ["nan.safetensors", "alpha"]),
    "bake-lora-ranks-differ": lambda c: (c.bake(str(kohya_lora(c.root / "ranks.safetensors", 3, up_rank=3))),
                                         ["ranks.safetensors", "input_blocks_1_1", "rank"]),
    "bake-lora-for-another-layer": lambda c: (c.bake(str(_peft_lora(c))), ["peft.safetensors", "match no tensor"]),
    "lora-merge-nan": lambda c: (["--lora", str(c.l), "--lora", str(kohya_lora(c.root / "nan.safetensors", 3,
                                                                                value=float("nan"))),
                                  "--rank", "2", "-o", str(c.out)], ["nan.safetensors", "NaN"]),
    # LyCORIS formats: a part missing, a change of another size, a part no format has, a DoRA file to merge
    "bake-loha-lacks-a-part": lambda c: (c.bake(str(lycoris_layer(c.root / "loha.safetensors", hada_w1_a=(8, 2),
                                                                  hada_w1_b=(2, 8), hada_w2_a=(8, 2)))),
                                         ["loha.safetensors", "input_blocks_1_1", "hada_w2_b"]),
    "bake-lokr-of-another-size": lambda c: (c.bake(str(lycoris_layer(c.root / "lokr.safetensors", lokr_w1=(2, 2),
                                                                     lokr_w2=(4, 2)))),
                                            ["lokr.safetensors", "LoKr changes (8, 4)", "(8, 8)"]),
    "bake-unknown-part": lambda c: (c.bake(str(lycoris_layer(c.root / "odd.safetensors", **{
        "lora_down.weight": (2, 8), "lora_up.weight": (8, 2), "ia3_w": (8,)}))), ["odd.safetensors", "ia3_w"]),
    "lora-merge-dora": lambda c: (["--lora", str(c.l), "--lora", str(lycoris_layer(
        c.root / "dora.safetensors", **{"lora_down.weight": (2, 8), "lora_up.weight": (8, 2), "dora_scale": (8, 1)})),
        "--rank", "2", "-o", str(c.out)], ["dora.safetensors", "DoRA", "depends on the model's weights"]),
    "lora-merge-ranks-differ": lambda c: (["--lora", str(kohya_lora(c.root / "ranks.safetensors", 3, up_rank=1)),
                                           "--lora", str(c.l), "--rank", "2", "-o", str(c.out)],
                                          ["ranks.safetensors", "rank"]),
    "lora-merge-peft-file": lambda c: (["--lora", str(c.l), "--lora", str(_peft_lora(c)), "--rank", "2", "-o",
                                        str(c.out)], ["peft.safetensors", "kohya"]),
    "extract-tuned-nan": lambda c: ([str(c.a), str(checkpoint(c.root / "nan.safetensors", 5, poison=BIGG_QKV)),
                                     "--rank", "2", "-o", str(c.out)], ["nan.safetensors", BIGG_QKV]),
    # files that are no Stable Diffusion checkpoint, or another one
    "merge-two-loras": lambda c: ([str(c.l), str(c.m), "-o", str(c.out)], ["l.safetensors", "not a Stable"]),
    "bake-into-a-lora": lambda c: ([str(c.l), "--lora", str(c.m), "-o", str(c.out)], ["l.safetensors"]),
    "extract-from-a-vae-file": lambda c: ([str(c.vae), str(c.b), "--rank", "2", "-o", str(c.out)],
                                          ["vae.safetensors", "not a Stable"]),
    "merge-sdxl-with-sd1": lambda c: (c.merge(_sd1(c)), ["sd1.safetensors", "architectures"]),
    "extract-identical": lambda c: ([str(c.a), str(c.a), "--rank", "2", "-o", str(c.out)], ["a.safetensors",
                                                                                           "do not differ"]),
    # pickles
    "pickle-without-allow-pickle": lambda c: (c.merge(_pickle(c, {"w": torch.ones(2)})),
                                              ["model.ckpt", "--allow-pickle"]),
    "pickle-garbage": lambda c: (c.merge(c.bytes_of(b"not a pickle", "model.ckpt"), "--allow-pickle"),
                                 ["model.ckpt"]),
    "pickle-not-a-dict": lambda c: (c.merge(_pickle(c, [torch.ones(2)]), "--allow-pickle"), ["model.ckpt", "list"]),
    "pickle-complex-dtype": lambda c: (c.merge(_pickle(c, {UNET_Q: torch.ones(8, 8, dtype=torch.complex64)}),
                                               "--allow-pickle"), ["model.ckpt", "complex"]),
    # the operating system says no
    "a-missing": lambda c: ([str(c.root / "nope.safetensors"), str(c.b), "-o", str(c.out)], ["nope.safetensors"]),
    "lora-missing": lambda c: (c.bake(str(c.root / "nope.safetensors")), ["nope.safetensors"]),
    "lora-merge-missing": lambda c: (["--lora", str(c.l), "--lora", str(c.root / "nope.safetensors"), "--rank", "2",
                                      "-o", str(c.out)], ["nope.safetensors"]),
    "b-a-folder": lambda c: (c.merge(c.folder()), ["folder", "no unet/ folder"]),
    "lora-a-folder": lambda c: (c.bake(str(c.folder())), ["folder"]),
    "vae-a-folder": lambda c: (c.merge(c.b, "--vae", str(c.folder())), ["folder"]),
    "output-under-a-file": lambda c: ([str(c.a), str(c.b), "-o", str(c.l / "out.safetensors")],
                                      ["l.safetensors/out.safetensors"]),
    "extract-output-under-a-file": lambda c: ([str(c.a), str(c.b), "--rank", "2", "-o",
                                               str(c.l / "lora.safetensors")], ["l.safetensors/lora.safetensors"]),
    "output-name-too-long": lambda c: ([str(c.a), str(c.b), "-o", str(c.root / ("x" * 300 + ".safetensors"))],
                                       ["x" * 300, "too long"]),
    "output-folder-holds-the-inputs": lambda c: ([str(c.a), str(c.b), "-o", str(c.root)],
                                                 [str(c.root), "inside the output folder"]),
    "output-exists": lambda c: ([str(c.a), str(c.b), "-o", str(c.bytes_of(b"an earlier merge", "earlier.safetensors"))],
                                ["earlier.safetensors", "already exists", "--overwrite"]),
    "output-folder-not-diffusers": lambda c: ([str(c.a), str(c.b), "-o", str(c.folder("folder", "notes.txt")),
                                               "--overwrite"], ["folder", "not a diffusers folder"]),
    # the output is an input: every mode, every spelling
    "merge-output-is-a": lambda c: (c.merge(c.b)[:-1] + [str(c.a)], ["a.safetensors", "one of the inputs"]),
    "merge-output-is-b-other-spelling": lambda c: (c.merge(c.b)[:-1] + [str(c.root / "." / "sub" / ".." / "b.safetensors")],
                                                   ["one of the inputs"]),
    "merge-output-symlink-to-a": lambda c: (c.merge(c.b)[:-1] + [str(c.symlink(c.a))], ["link.safetensors"]),
    "merge-output-hard-link-of-b": lambda c: (c.merge(c.b)[:-1] + [str(c.hardlink(c.b))], ["hard.safetensors"]),
    "add-difference-output-is-c": lambda c: ([str(c.a), str(c.b), "--c", str(c.c), "--method", "add_difference",
                                              "-o", str(c.c)], ["c.safetensors", "one of the inputs"]),
    "merge-output-is-the-vae": lambda c: ([str(c.a), str(c.b), "--vae", str(c.vae), "-o", str(c.vae)],
                                          ["vae.safetensors", "one of the inputs"]),
    "bake-output-is-the-lora": lambda c: ([str(c.a), "--lora", f"{c.l}:0.5", "-o", str(c.l)],
                                          ["l.safetensors", "one of the inputs"]),
    "bake-output-symlink-to-a": lambda c: ([str(c.a), "--lora", str(c.l), "-o", str(c.symlink(c.a))],
                                           ["one of the inputs"]),
    "extract-output-is-a": lambda c: ([str(c.a), str(c.b), "--rank", "2", "-o", str(c.a)],
                                      ["a.safetensors", "one of the inputs"]),
    "extract-output-hard-link-of-b": lambda c: ([str(c.a), str(c.b), "--rank", "2", "-o", str(c.hardlink(c.b))],
                                                ["one of the inputs"]),
    "lora-merge-output-is-a-lora": lambda c: (["--lora", str(c.l), "--lora", str(c.m), "--rank", "2", "-o", str(c.l)],
                                              ["l.safetensors", "one of the inputs"]),
    "lora-merge-output-symlink": lambda c: (["--lora", str(c.l), "--lora", str(c.m), "--rank", "2", "-o",
                                             str(c.symlink(c.m))], ["one of the inputs"]),
    "lora-merge-output-hard-link": lambda c: (["--lora", str(c.l), "--lora", f"{c.m}:0.3", "--rank", "2", "-o",
                                               str(c.hardlink(c.l))], ["one of the inputs"]),
    # bad flags
    "alpha-nan": lambda c: (c.merge(c.b, "--alpha", "nan"), ["--alpha", "finite"]),
    "alpha-inf": lambda c: (c.merge(c.b, "--alpha", "inf"), ["--alpha", "finite"]),
    "alpha-not-a-number": lambda c: (c.merge(c.b, "--alpha", "half"), ["--alpha"]),
    "block-alphas-nan": lambda c: (c.merge(c.b, "--block-alphas", "nan,0,1"), ["--block-alphas", "finite"]),
    # the corpus's UNet has one block (IN01): 3 numbers (IN, MID, OUT), 1, or 2 (BASE first) fit it
    "block-alphas-count": lambda c: (c.merge(c.b, "--block-alphas", "0.1,0.2,0.3,0.4"), ["--block-alphas", "got 4"]),
    "block-alphas-words": lambda c: (c.merge(c.b, "--block-alphas", "a,b,c"), ["--block-alphas"]),
    "lora-ratio-nan": lambda c: (c.bake(f"{c.l}:nan"), ["l.safetensors", "finite"]),
    "lora-ratio-word": lambda c: (c.bake(f"{c.l}:abc"), ["l.safetensors", "abc"]),
    "rank-zero": lambda c: ([str(c.a), str(c.b), "--rank", "0", "-o", str(c.out)], ["--rank"]),
    "rank-not-an-integer": lambda c: ([str(c.a), str(c.b), "--rank", "2.5", "-o", str(c.out)], ["--rank"]),
    "clamp-quantile-negative": lambda c: (c.merge(c.b, "--rank", "2", "--clamp-quantile", "-1"),
                                          ["--clamp-quantile"]),
    "clamp-quantile-nan": lambda c: (c.merge(c.b, "--rank", "2", "--clamp-quantile", "nan"), ["--clamp-quantile"]),
    "threads-zero": lambda c: (c.merge(c.b, "--threads", "0"), ["--threads"]),
    "unknown-method": lambda c: (c.merge(c.b, "--method", "average"), ["--method"]),
    "unknown-dtype-flag": lambda c: (c.merge(c.b, "--dtype", "fp8"), ["--dtype"]),
    "add-difference-without-c": lambda c: (c.merge(c.b, "--method", "add_difference"), ["add_difference"]),
    "rank-with-a-only": lambda c: ([str(c.a), "--rank", "2", "-o", str(c.out)], ["--rank"]),
    "no-output": lambda c: ([str(c.a), str(c.b)], ["-o"]),
}


@pytest.mark.parametrize("make", [pytest.param(make, id=name) for name, make in CASES.items()])
def test_bad_input_is_one_clean_error_and_changes_nothing(make, tmp_path, capsys):
    corpus = Corpus(tmp_path)
    argv, mentions = make(corpus)
    fails_cleanly(merge_cli.main, argv, capsys, mentions, tmp_path)  # no output, no temporary file left


def test_the_previous_output_survives_a_failed_merge(tmp_path, capsys):
    corpus = Corpus(tmp_path)
    assert merge_cli.main(corpus.merge(corpus.b)) == 0
    nan = checkpoint(tmp_path / "nan.safetensors", 5, poison=TE1_Q)  # found half-way through the merge
    before = snapshot(tmp_path)
    assert_clean_error(merge_cli.main, corpus.merge(nan, "--overwrite"), capsys, "nan.safetensors", TE1_Q)
    assert snapshot(tmp_path) == before


def test_a_model_merged_with_itself_is_itself(tmp_path):
    corpus = Corpus(tmp_path)
    assert merge_cli.main([str(corpus.a), str(corpus.a), "-o", str(corpus.out), "--alpha", "0.3"]) == 0
    a, out = load_file(str(corpus.a)), load_file(str(corpus.out))
    assert all(torch.equal(out[k], a[k]) for k in a)
    from safetensors import safe_open
    with safe_open(str(corpus.out), "pt") as f:
        models = json.loads(f.metadata()["sd_merge_models"])
    assert [m["role"] for m in models.values()] == ["A,B"]


def test_pickled_inputs_merge_with_allow_pickle(tmp_path):
    corpus = Corpus(tmp_path)
    ckpt = _pickle(corpus, {"state_dict": load_file(str(corpus.b))})
    assert merge_cli.main(corpus.merge(ckpt, "--allow-pickle", "--alpha", "1")) == 0
    b, out = load_file(str(corpus.b)), load_file(str(corpus.out))
    assert torch.equal(out[UNET_Q], b[UNET_Q]) and torch.equal(out[VAE], load_file(str(corpus.a))[VAE])


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    corpus = Corpus(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_file = tmp_path / f".out.safetensors.{dead_pid}.abcd_123.tmp"
    stale_folder = tmp_path / f".out.safetensors.{dead_pid}.q1w2e3r4.tmp"
    live = tmp_path / f".out.safetensors.{os.getppid()}.abcdefgh.tmp"  # a live process's save in progress
    others = [tmp_path / ".out.safetensors.notes.tmp", tmp_path / f".other.safetensors.{dead_pid}.abcdefgh.tmp"]
    for path in [stale_file, live, *others]:
        path.write_text("x")
    stale_folder.mkdir()
    (stale_folder / "unet").mkdir()
    assert merge_cli.main(corpus.merge(corpus.b)) == 0
    assert not stale_file.exists() and not stale_folder.exists()
    assert live.exists() and all(p.exists() for p in others)


# ------------------------------------------------------------------------------------------------------- kill -9

KILLED_MERGE = textwrap.dedent("""
    import os, sys, time
    import torch
    sys.path.insert(0, {repo!r})
    import merge as merge_cli
    from minigen import io
    from minigen.merge import checkpoints

    where = sys.argv[1]
    real_write, real_replace = io.SafetensorsWriter.write, io.os.replace

    def slow_write(self, name, tensor):  # a merge that lasts long enough to be killed at a random moment
        time.sleep(0.05)
        real_write(self, name, tensor)

    def replace(src, dst):  # announce the final rename and wait there to be killed
        if where == "before-rename":
            print("renaming", flush=True)
            time.sleep(30)
        real_replace(src, dst)
        if where == "after-rename":
            print("renamed", flush=True)
            time.sleep(30)

    io.SafetensorsWriter.write = slow_write
    io.os.replace = replace
    print("ready", flush=True)
    merge_cli.main(sys.argv[2:])
""")


def run_and_kill(tmp_path: Path, where: str, argv: list[str], delay: float | None = None) -> None:
    """Run merge.py in a subprocess; kill -9 it `delay` seconds after it is ready, or when it reports `where`."""
    script = tmp_path / "killed_merge.py"
    script.write_text(KILLED_MERGE.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script), where, *argv], stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        if delay is None:
            assert proc.stdout.readline().strip() in ("renaming", "renamed")
        else:
            proc.stdout.close()
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("where", ["random-moment", "before-rename", "after-rename"])
def test_kill_9_leaves_the_previous_or_the_complete_new_output(where, tmp_path):
    corpus = Corpus(tmp_path)
    old = corpus.a.read_bytes()
    corpus.out.write_bytes(old)  # a previous output
    inputs = {p: p.read_bytes() for p in (corpus.a, corpus.b)}
    argv = corpus.merge(corpus.b, "--alpha", "1", "--overwrite")  # the new output is B's tensors: easy to recognise
    run_and_kill(tmp_path, where, argv, delay=random.uniform(0, 0.6) if where == "random-moment" else None)
    new = {k: v for k, v in load_file(str(corpus.b)).items()}
    got = corpus.out.read_bytes()
    if got != old:
        out = load_file(str(corpus.out))  # complete: every tensor readable, and the merge's result
        assert all(torch.equal(out[k], new[k]) for k in SHAPES if k != VAE)
    if where == "before-rename":
        assert got == old
    if where == "after-rename":
        assert got != old
    assert all(p.read_bytes() == data for p, data in inputs.items())
    assert merge_cli.main(argv) == 0  # a later run finishes, and removes what the killed one left behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []
