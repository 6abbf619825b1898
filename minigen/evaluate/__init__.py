"""Judging models and LoRAs with the same prompts and noise (`eval.py`): `inputs` (the rows, prompts and settings,
checked before anything loads), `run` (generate, measure, score), `report` (the table, the grids, the FID curve).
Imports the shared modules, `fid`, `sd` and `finetune`'s memory plan.
"""
