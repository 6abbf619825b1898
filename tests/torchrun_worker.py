"""A minigen CLI's main() under torchrun, with test hooks (used by tests/test_distributed.py):

    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_worker.py HOOKS_JSON train_lora ARGS...

HOOKS_JSON, all optional:
  "stop_after": N      training stops after N optimizer steps and saves a checkpoint (the last save of a killed run)
  "record": PATH       rank 0 writes the LoRA weights after every optimizer step to PATH (keys "STEP/NAME")
  "fail": [RANK, STEP] that rank raises ValueError("rank RANK broke at step STEP") when it reaches that step
  "sigterm": [RANK, STEP] that rank sends itself SIGTERM while computing the loss after STEP optimizer steps
  "vcuda": true         the run sees a virtual GPU per rank (tests/vcuda.py; --device cuda, nccl runs as gloo); each
                        rank prints its events (set_device, init_process_group) on stderr
  "float64": true       torch's default dtype is float64 (models, images, random draws): the logic without fp32 rounding
For train_gan a step is an iteration, "record" writes G's and D's state dicts (keys "ITERATION/G.NAME"), and
  "sigterm": [RANK, ITERATION] that rank sends itself SIGTERM during that iteration
"""

import contextlib
import importlib
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from minigen.gan.trainer import GANTrainer  # noqa: E402
from minigen.finetune.trainer import LoRATrainer  # noqa: E402
from vcuda import VirtualCuda  # noqa: E402


def install_gan_hooks(hooks: dict, rank: int) -> dict:
    recorded: dict = {}
    step = GANTrainer.step

    def hooked_step(self, real):
        if hooks.get("fail") == [rank, self.iteration + 1]:
            raise ValueError(f"rank {rank} broke at iteration {self.iteration + 1}")
        if hooks.get("sigterm") == [rank, self.iteration + 1]:
            os.kill(os.getpid(), signal.SIGTERM)
        stats = step(self, real)
        if "record" in hooks and rank == 0:
            for name, model in (("G", self.G), ("D", self.D)):
                recorded.update({f"{self.iteration}/{name}.{k}": v.contiguous().clone()  # channels-last too
                                 for k, v in model.state_dict().items()})
        return stats
    GANTrainer.step = hooked_step
    return recorded


def install_lora_hooks(hooks: dict, rank: int) -> dict:
    recorded: dict = {}
    if "stop_after" in hooks:
        train = LoRATrainer.train
        LoRATrainer.train = lambda self: train(self, stop_after_steps=hooks["stop_after"])
    if "record" in hooks and rank == 0:
        step = LoRATrainer.optimizer_step

        def recording_step(self):
            step(self)
            recorded.update({f"{self.step}/{k}": v.detach().clone() for k, v in self.trainable().items()})
        LoRATrainer.optimizer_step = recording_step
    loss = LoRATrainer.loss

    def hooked_loss(self, *args):
        if hooks.get("fail") == [rank, self.step]:
            raise ValueError(f"rank {rank} broke at step {self.step}")
        if hooks.get("sigterm") == [rank, self.step]:
            hooks.pop("sigterm")  # once: the signal stops the run at the next optimizer step
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *args)
    LoRATrainer.loss = hooked_loss
    return recorded


def main() -> int:
    hooks, program, argv = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    if hooks.get("float64"):
        torch.set_default_dtype(torch.float64)
    rank = int(os.environ.get("RANK", "0"))
    recorded = (install_gan_hooks if program == "train_gan" else install_lora_hooks)(hooks, rank)
    virtual = VirtualCuda(gpus=int(os.environ["WORLD_SIZE"])) if hooks.get("vcuda") else None
    with virtual or contextlib.nullcontext():
        code = importlib.import_module(program).main(argv)
    if virtual:
        print(f"vcuda events of rank {rank}: {virtual.events}", file=sys.stderr)
    if recorded:
        save_file(recorded, hooks["record"])
    return code


if __name__ == "__main__":
    sys.exit(main())
