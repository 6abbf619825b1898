"""`make bench-gpu SMOKE=1`: the GPU suite's own script, run on the CPU with tiny configs, so it never rots before a
GPU is lent. It asserts the script ran every bench to the end and wrote its report, not any speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_gpu  # noqa: E402


def test_the_gpu_suite_runs_end_to_end_on_the_cpu(tmp_path):
    assert bench_gpu.main(["--smoke", "--out", str(tmp_path / "report")]) == 0
    result = json.loads((tmp_path / "report.json").read_text())
    assert [b["module"] for b in result["benches"]] == [module for _, module, _, _ in bench_gpu.SUITE]
    assert all(b["error"] is None and b["output"].strip() for b in result["benches"])
    assert "ratio" in next(b for b in result["benches"] if b["module"] == "bench_lora")["output"]
    (plan,) = result["plan"]
    assert abs(plan["ratio"] - 1) < 0.15  # the plan against the same steps on real tensors
    builds = {b["module"]: b["builds"] for b in result["benches"]}
    assert builds["bench_unet"] == {"diffusers UNet": 1, "minigen UNet (same weights)": 1}  # one random init
    assert builds["bench_lora"]["minigen UNet"] == 1  # its weights made once, for every copy
    markdown = (tmp_path / "report.md").read_text()
    assert "## Memory plan vs measured peak" in markdown and "| bench_gan |" in markdown


def test_a_budget_skips_what_would_not_fit_and_says_so(tmp_path, capsys):
    assert bench_gpu.main(["--smoke", "--out", str(tmp_path / "report"), "--budget-s", "0.01"]) == 0
    result = json.loads((tmp_path / "report.json").read_text())
    assert all(b["skipped"].startswith("estimated ") and "of --budget-s left" in b["skipped"] for b in result["benches"])
    assert result["plan"] == [] and result["plan_skipped"]
    assert "bench_unet: skipped: estimated" in capsys.readouterr().out
    assert "| bench_gan | 0 | skipped: estimated" in (tmp_path / "report.md").read_text()
    # a previous run's measured seconds replace the built-in estimates
    assert bench_gpu.estimates(str(tmp_path / "report.json"))["bench_gan"] == bench_gpu.ESTIMATE_S["bench_gan"]
    result["benches"][-1] |= {"skipped": None, "seconds": 3.0}
    (tmp_path / "measured.json").write_text(json.dumps(result))
    assert bench_gpu.estimates(str(tmp_path / "measured.json"))["bench_gan"] == 3.0


def test_the_dry_run_adds_counted_builds_measured_costs_and_estimates(monkeypatch, capsys):
    """bench/gpu_dry_run.py's arithmetic, on stand-in figures (the real run takes minutes: a smoke suite and a full-size
    plan trace): bench_lora's copies doubled (two checkpointing settings on a GPU), bench_sample's read from its code."""
    import gpu_dry_run

    builds = {"bench_unet": {"diffusers UNet": 1, "minigen UNet (same weights)": 1},
              "bench_lora": {"minigen UNet": 1, "minigen UNet (same weights)": 1}}
    construct = {"diffusers unet": 2.0, "minigen unet": 0.5}
    table = gpu_dry_run.rows(builds, construct, trace_s=40.0)
    by_part = {row[0]: row for row in table}
    assert by_part["bench_lora: construct minigen UNet (same weights)"][1:4] == (2, 0.5, 1.0)
    assert by_part["memory plan: full-size traces"][3] == 80.0
    estimated = bench_gpu.ESTIMATE_S["bench_unet"] + bench_gpu.ESTIMATE_S["bench_lora"] + 10.0
    assert table[-1][3] == estimated + 2.0 + 0.5 + 0.5 + 1.0 + 80.0
    monkeypatch.setattr(gpu_dry_run, "counted_builds", lambda: builds | gpu_dry_run.GPU_BUILDS)
    monkeypatch.setattr(gpu_dry_run, "construction_seconds", lambda: construct | {
        f"{side} {part}": 1.0 for side in ("minigen", "diffusers") for part in gpu_dry_run.PARTS})
    monkeypatch.setattr(gpu_dry_run, "plan_trace_seconds", lambda: 40.0)
    assert gpu_dry_run.main(["--budget-s", "480"]) == 0
    assert gpu_dry_run.main(["--budget-s", "60"]) == 1
    out = capsys.readouterr().out
    assert "| bench_sample: construct diffusers unet | 1 |" in out and "does not fit --budget-s 60" in out
