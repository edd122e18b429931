"""``make gpu-check`` (ddsm_train/gpu_check.py) on a machine without a GPU: it picks the tiny
sizes by itself and runs every path (model building, the four training modes through the
trainers' strategy/precision/compile code, the data loader, prediction, the numerics checks)
on the CPU, so the GPU check never breaks unnoticed."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    out_json = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               NUM_CPU_CORES="2", PYTHONPATH=REPO)
    env.pop("NUM_GPU_DEVICES", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "ddsm_train", "gpu_check.py"),
                           "--json", str(out_json)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    assert "tiny sizes" in table and "all checks passed" in table
    assert "no GPU on this machine: the speed columns" in table
    result = json.loads(out_json.read_text())
    assert result["tiny"] and not result["failures"]
    rows = {(r["model"].split()[0], r["what"]): r for r in result["rows"]}
    for mode in ("float32", "float16", "bfloat16", "jit"):
        row = rows[("demo", f"train {mode}")]
        assert row["ok"] and row["rate"] > 0 and row["ratio"] > 0, row
        assert mode in table
    for model in ("demo", "ResNet50"):
        assert rows[(model, "predict")]["rate"] > 0
        assert rows[(model, "predict 4 flips")]["rate"] > 0
        assert rows[(model, "loader, 2 workers")]["rate"] > 0
    assert "max|p - p32|" in rows[("demo", "train float16")]["note"]
    assert rows[("ResNet50", "train (all modes)")]["note"] == "skipped at tiny sizes"


def test_gpu_check_table_and_failures():
    sys.path.insert(0, os.path.join(REPO, "ddsm_train"))
    import gpu_check

    report = gpu_check.Report("test device")
    report.rows.append(gpu_check.Row("m", "train float32", 10, 2.0, "steps/s", 20.0, 1.0,
                                     1024.0, "loss 0.7"))
    report.fail("m float16: probabilities differ")
    text = gpu_check.format_table(report, 2, 4, "MirroredStrategy, 2 replica(s)")
    assert "NUM_GPU_DEVICES=2 (MirroredStrategy, 2 replica(s))" in text
    assert "1,024" in text and "FAILED: m float16" in text and "1 check(s) failed" in text
    assert "no GPU" not in text
    cpu = gpu_check.format_table(report, 1, 4, has_gpu=False).splitlines()
    assert cpu[1] == "NOTE: " + gpu_check.NO_GPU_NOTE and "speed columns" in cpu[1]
    specs = gpu_check.model_specs(tiny=False)
    assert specs["resnet50"].img_size == (1152, 896) and specs["resnet50"].batch == 10
    assert specs["demo"].img_size == (288, 224) and specs["demo"].batch == 16
