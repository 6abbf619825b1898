"""Checkpoint merging that streams, as seed 004 and the merge tools do: `checkpoints` (weighted sum, add difference,
block weights, streamed tensor by tensor), `bake` (LoRA files folded into a checkpoint), `extract` (a LoRA from the
difference of two checkpoints; several LoRAs merged into one). Imports the shared modules, `lora` and `sd`.
"""
