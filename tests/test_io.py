"""minigen.io: atomic, streaming safetensors that the reference library reads; truncation and pickles refused."""

import pytest
import torch
from safetensors.torch import load_file

from minigen.atomic import atomic_write
from minigen.io import (CheckpointError, SafetensorsWriter, all_finite, load_safetensors, load_weights, read_header,
                        save_safetensors)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 2, 3, generator=g).bfloat16(),
        "d.int": torch.arange(5, dtype=torch.int64),
        "e.scalar": torch.tensor(4.0),
    }


def test_save_roundtrip_readable_by_safetensors(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "w.safetensors"
    save_safetensors(tensors, path, metadata={"rank": 4})
    ref = load_file(str(path))  # the reference reader accepts our streamed header
    ours, meta = load_safetensors(path)
    assert meta == {"rank": "4"}
    for k, v in tensors.items():
        assert torch.equal(ref[k], v) and ref[k].dtype == v.dtype
        assert torch.equal(ours[k], v)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_streaming_writer_order_and_abort(tmp_path):
    path = tmp_path / "s.safetensors"
    specs = {"x": ((2, 2), torch.float32), "y": ((3,), torch.float16)}
    with pytest.raises(ValueError, match="expected tensor 'x'"):
        with SafetensorsWriter(path, specs) as w:
            w.write("y", torch.zeros(3, dtype=torch.float16))
    assert not path.exists() and list(tmp_path.iterdir()) == []  # aborted: nothing left
    with pytest.raises(ValueError, match="never written"):
        with SafetensorsWriter(path, specs) as w:
            w.write("x", torch.ones(2, 2))
    assert not path.exists()
    with SafetensorsWriter(path, specs) as w:
        w.write("x", torch.ones(2, 2))
        w.write("y", torch.full((3,), 2.0, dtype=torch.float16))
    assert torch.equal(load_file(str(path))["y"], torch.full((3,), 2.0, dtype=torch.float16))


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors(sample_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_safetensors(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


def test_pickle_refused_unless_allowed(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_weights(path)
    tensors, _ = load_weights(path, allow_pickle=True)
    assert torch.equal(tensors["w"], torch.ones(2))


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "good"
    assert list(tmp_path.iterdir()) == [path]


def test_saved_files_have_normal_permissions(tmp_path):
    import os
    path = tmp_path / "w.safetensors"
    save_safetensors({"x": torch.zeros(1)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0o600


@pytest.mark.parametrize("header", [[], {"x": 1}, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                                    {"__metadata__": {"k": 1}}],
                         ids=["a-list", "entry-not-an-object", "bytes-not-shape-x-dtype", "metadata-not-strings"])
def test_every_reader_validates_the_header(tmp_path, header):
    import json
    import struct

    from minigen.io import open_safetensors

    path = tmp_path / "bad.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    for read in (read_header, load_safetensors, open_safetensors, load_weights):
        with pytest.raises(CheckpointError, match="bad.safetensors"):
            read(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_every_nan_and_infinity(dtype):
    """The check by the sum (NaN and infinity carry through it) answers like testing each value, also where the sum
    itself overflows while every value is finite, and where +inf and -inf would cancel into NaN."""
    big = torch.finfo(dtype).max
    assert all_finite(torch.zeros(5, dtype=dtype)) and all_finite(torch.arange(4))  # integers are always finite
    assert all_finite(torch.full((4,), big, dtype=dtype))  # the sum overflows fp32 (bf16 and fp32), the values do not
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(1000, dtype=dtype)
        t[517] = bad
        assert not all_finite(t)
    t = torch.ones(10, dtype=dtype)
    t[2], t[7] = float("inf"), -float("inf")
    assert not all_finite(t)
