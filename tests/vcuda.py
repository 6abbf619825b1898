"""A virtual CUDA device for the tests: every `device.type == "cuda"` branch of minigen runs on this CPU-only torch.

    with VirtualCuda():                      # or the `vcuda` fixture (conftest.py), or the torchrun hook "vcuda"
        train_lora.main([..., "--device", "cuda"])

Inside, a tensor "on cuda" is a real CPU tensor whose storage is listed as a CUDA storage: `.device` says cuda:0,
`.is_cuda` is true, and every op goes through `VirtualCuda.__torch_dispatch__`, which enforces what CUDA enforces:
  - an op that mixes a CUDA tensor with a CPU tensor of one element or more fails with CUDA's message (0-dim CPU
    tensors are scalars, allowed; a CUDA tensor may be indexed by CPU indices);
  - a CPU `torch.Generator` drawing a CUDA tensor fails; `.numpy()` of a CUDA tensor fails;
  - what CUDA tensors draw without a generator comes from the virtual CUDA generator, a stream of its own, seeded by
    torch.manual_seed and torch.cuda.manual_seed, whose state torch.cuda.get_rng_state/set_rng_state read and set
    (a CPU generator underneath: the numbers are not CUDA's Philox numbers, the bookkeeping is the same);
and marks what the op returns as CUDA when it read a CUDA tensor or was asked for one. torch.cuda's functions are
stand-ins (`is_available`, one device unless `gpus`, `mem_get_info` from `free_bytes`, `set_device` recorded in
`events`), `autocast("cuda")` runs as the CPU's autocast, and `init_process_group("nccl")` opens gloo.

What it cannot show: CUDA's kernels (fused optimizers' layout rules, flash/efficient attention's limits, cuDNN, TF32,
CUDA autocast's op lists: the CPU's are used), speed, memory (mem_get_info is what `free_bytes` says), NCCL itself,
and CUDA's own random numbers (the stream above is a CPU generator's). Those need a real GPU (`make bench-gpu`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ABSENT = object()
aten = torch.ops.aten
# Ops that may take a CPU and a CUDA tensor together: copies between devices, and reading a value out.
CROSSING = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default, aten._copy_from_and_resize.default,
            aten.set_.source_Storage, aten.set_.source_Storage_storage_offset, aten.set_.source_Tensor,
            aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.detach.default, aten.alias.default,
            aten._local_scalar_dense.default}
FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "arange",
             "linspace", "eye")
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _storage_id(t: torch.Tensor) -> int | None:
    """The id of t's storage, or None for tensors without one of their own (fake, meta, sparse, wrapper subclasses)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_meta or t.layout != torch.strided:
        return None
    return t.untyped_storage()._cdata


class VirtualCuda(TorchDispatchMode):
    """See the module docstring. One at a time; the patches are undone on exit."""

    def __init__(self, free_bytes: float = 79e9, gpus: int = 1, bf16: bool = True):
        super().__init__()
        self.free_bytes, self.gpus, self.bf16 = int(free_bytes), gpus, bf16
        self.cuda_storages: dict[int, torch.UntypedStorage] = {}  # storage id -> the storage (held: ids stay unique)
        self.neutral: dict[int, torch.UntypedStorage] = {}  # made by torch's own code "on the CPU": either device
        self.user_calls = 0  # > 0 inside a call of the user's that asks for the CPU (torch.zeros(...), .cpu())
        self.generator = torch.Generator().manual_seed(0)  # the CUDA generator's stand-in
        self.index = 0  # the current device: cuda:0 until torch.cuda.set_device (a torchrun rank's own GPU)
        self.events: list[str] = []
        self.patches: list[tuple[object, str, object]] = []
        self.remembered = 0

    # ---- which storages are CUDA's ----

    def is_cuda(self, t: torch.Tensor) -> bool:
        return _storage_id(t) in self.cuda_storages

    def remember(self, out, table: dict):
        """List `out`'s storages in `table` (cuda_storages or neutral); returns `out`."""
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (key := _storage_id(t)) is not None:
                table.setdefault(key, t.untyped_storage())
        self.remembered += 1
        if self.remembered % 2000 == 0:  # forget storages only these lists still hold
            for listed in (self.cuda_storages, self.neutral):
                for key in [k for k in listed if torch._C._storage_Use_Count(k) <= 1]:
                    del listed[key]
        return out

    # ---- the dispatcher ----

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_cuda = [t for t in tensors if self.is_cuda(t)]
        asked = None if kwargs.get("device") is None else torch.device(kwargs["device"])
        if asked is not None and asked.type == "cpu" and not self.user_calls:
            # Patch: torch's own code asking for the CPU (a C++ op's scratch tensor, autocast's cast) copies its
            # input's options, which say cpu underneath: it means the device its inputs are on
            asked = None if on_cuda else asked
            if not tensors:
                return self.remember(func(*args, **kwargs), self.neutral)
        to_cuda = asked is not None and asked.type == "cuda"
        cuda_op = to_cuda or (bool(on_cuda) and asked is None)
        if to_cuda:
            kwargs["device"] = torch.device("cpu")
        if cuda_op and kwargs.get("generator") is not None:
            if kwargs["generator"].device.type != "cuda":
                raise RuntimeError(f"{func}: Expected a 'cuda' device type for generator but found 'cpu' (vcuda)")
        elif cuda_op and any(a.name == "generator" for a in func._schema.arguments):
            kwargs["generator"] = self.generator  # the CUDA generator draws what CUDA tensors draw by default
        if on_cuda and not to_cuda and func not in CROSSING:
            self.check_one_device(func, args, tensors)
        if cuda_op and func is aten.native_dropout.default and args[2] is not False:
            out = self.dropout(*args)  # Patch: the CPU kernel draws from the CPU generator, CUDA's from CUDA's
        else:
            out = func(*args, **kwargs)
        return self.remember(out, self.cuda_storages) if cuda_op else out

    def check_one_device(self, func, args, tensors) -> None:
        if func in INDEXING:
            if not self.is_cuda(args[0]):
                raise RuntimeError(f"{func}: indices are on cuda:0, the indexed tensor on cpu (vcuda)")
            return
        cpu = [t for t in tensors if not self.is_cuda(t) and t.dim() > 0 and _storage_id(t) is not None
               and _storage_id(t) not in self.neutral]
        if cpu:
            raise RuntimeError(f"{func}: Expected all tensors to be on the same device, but found at least two "
                               f"devices, cuda:0 and cpu! (vcuda: cpu shapes {[tuple(t.shape) for t in cpu]})")

    def set_device(self, device) -> None:
        self.index = device if isinstance(device, int) else torch.device(device).index or 0
        self.events.append(f"set_device({self.index})")

    @contextlib.contextmanager
    def user_call(self):
        self.user_calls += 1
        try:
            yield
        finally:
            self.user_calls -= 1

    def dropout(self, x: torch.Tensor, p: float, train) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.empty_like(x).bernoulli_(1 - p, generator=self.generator)  # (same shape as x)
        return x * keep / (1 - p) if p < 1 else x * 0, keep.bool()

    # ---- the Python side: devices, copies, torch.cuda ----

    def patch(self, owner, name: str, value) -> None:
        self.patches.append((owner, name, vars(owner).get(name, ABSENT)))  # ABSENT: inherited, deleted on exit
        setattr(owner, name, value)

    def __enter__(self):
        vc, real_device, real_numpy = self, torch.Tensor.device, torch.Tensor.numpy
        real_to, real_is_cuda = torch.Tensor.to, torch.Tensor.is_cuda

        def to(t, *args, copy=False, **kwargs):
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
            if args and isinstance(args[0], torch.Tensor):
                device = args[0].device  # the device it reports
            dtype, fmt = dtype or t.dtype, {} if memory_format is None else {"memory_format": memory_format}
            if device is None or torch.device(device).type == t.device.type:  # torch's own rules: t itself if no-op
                return real_to(t, dtype=dtype, non_blocking=non_blocking, copy=copy, **fmt)
            with vc.user_call():
                return aten._to_copy.default(t, dtype=dtype, device=torch.device(device), **fmt)

        def users(make):  # torch.zeros(...) and its kind: what the user asks for (a CPU tensor is the user's own)
            def wrapper(*args, device=None, **kwargs):
                if make in (real_tensor, real_as_tensor) and device is not None and torch.device(device).type == "cuda":
                    requires_grad = kwargs.pop("requires_grad", False)  # torch.tensor's C++ cannot make CUDA ones
                    t = to(make(*args, **kwargs), device)
                    return t.requires_grad_() if requires_grad else t
                with vc.user_call():
                    return make(*args, device=device, **kwargs)
            return wrapper
        real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

        def numpy(t, *args, **kwargs):
            if vc.is_cuda(t):
                raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                                "tensor to host memory first. (vcuda)")
            return real_numpy(t, *args, **kwargs)

        def cuda_autocast(device_type, *args, **kwargs):
            return real_autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)
        real_autocast = torch.autocast

        def init_process_group(backend=None, *args, **kwargs):
            vc.events.append(f"init_process_group({backend})")
            return real_init("gloo" if backend == "nccl" else backend, *args, **kwargs)
        real_init = dist.init_process_group

        def manual_seed(seed):
            vc.generator.manual_seed(int(seed))

        self.patch(torch.Tensor, "device", property(lambda t: torch.device("cuda", vc.index) if vc.is_cuda(t)
                                                   else real_device.__get__(t)))
        self.patch(torch.Tensor, "is_cuda", property(lambda t: vc.is_cuda(t) or real_is_cuda.__get__(t)))
        self.patch(torch.Tensor, "to", to)
        self.patch(torch.Tensor, "cuda", lambda t, device=None, non_blocking=False, **k: to(t, "cuda"))
        self.patch(torch.Tensor, "cpu", lambda t, memory_format=torch.preserve_format: to(t, "cpu"))
        self.patch(torch.Tensor, "numpy", numpy)
        for name in FACTORIES:
            self.patch(torch, name, users(getattr(torch, name)))
        real_new_tensor = torch.Tensor.new_tensor
        self.patch(torch.Tensor, "new_tensor", lambda t, data, dtype=None, device=None, requires_grad=False: (
            lambda n: n.requires_grad_() if requires_grad else n)(to(real_new_tensor(t, data, dtype=dtype,
                                                                                    device="cpu"), device or t.device)))
        self.patch(torch, "autocast", cuda_autocast)
        self.patch(torch.amp, "autocast", cuda_autocast)
        self.patch(dist, "init_process_group", init_process_group)
        cuda = torch.cuda
        stand_ins = {
            "is_available": lambda: True, "device_count": lambda: self.gpus, "current_device": lambda: self.index,
            "_lazy_init": lambda: None, "is_initialized": lambda: True,
            "set_device": self.set_device,
            "mem_get_info": lambda device=None: (self.free_bytes, int(80e9)),
            "synchronize": lambda device=None: None, "empty_cache": lambda: None,
            "get_device_name": lambda device=None: "virtual GPU (vcuda)",
            "get_device_capability": lambda device=None: (9, 0),
            "max_memory_allocated": lambda device=None: 0, "memory_allocated": lambda device=None: 0,
            "reset_peak_memory_stats": lambda device=None: None,
            "is_bf16_supported": lambda including_emulation=True: self.bf16,
            "get_rng_state": lambda device="cuda": self.generator.get_state(),
            "set_rng_state": lambda state, device="cuda": self.generator.set_state(state),
            "get_rng_state_all": lambda: [self.generator.get_state()],
            "set_rng_state_all": lambda states: self.generator.set_state(states[0]),
            "manual_seed": manual_seed, "manual_seed_all": manual_seed,
        }
        for name, value in stand_ins.items():
            self.patch(cuda, name, value)
        self.patch(cuda.amp.common, "amp_definitely_not_available", lambda: False)
        self.patch(cuda, "device", lambda device=None: contextlib.nullcontext())
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        for owner, name, value in reversed(self.patches):
            if value is ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        self.patches.clear()
        return result


