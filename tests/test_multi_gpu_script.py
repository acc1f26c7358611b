"""benchmarks/multi_gpu.py (the multi-GPU measurements) on two CPU processes (gloo): its stages run, its JSON holds
what the table reads, and its kill -9 stage finds the resumed losses equal to the uninterrupted run's."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_multi_gpu_script_on_two_cpu_processes(dataset, tmp_path):
    res = tmp_path / "res"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--gpus", "2", "--device", "cpu",
                        "--data", str(dataset), "--runs", str(tmp_path / "runs"), "--results", str(res),
                        "--presets", "llama-tiny-elas", "--parallel", "ddp", "--kill-preset", "llama-tiny-elas",
                        "--steps", "4", "--log-every", "2", "--batch", "2", "--kill-steps", "4",
                        "--kill-save-every", "2", "--set", "seq_len=32", "--set", "model.vocab_size=512",
                        "--stages", "scale,kill,table"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    scale = json.loads((res / "multi_gpu_scale.json").read_text())
    row = scale["rows"][0]
    assert row["parallel"] == "ddp" and row["one"]["returncode"] == 0 and row["many"]["returncode"] == 0
    assert row["one"]["tokens_per_s"] > 0 and row["efficiency"] > 0
    kill = json.loads((res / "multi_gpu_kill.json").read_text())
    assert kill["killed_returncode"] != 0 and kill["killed_by_signal"]
    assert kill["same_count_bit_identical"] and kill["one_process_within_tolerance"]
    assert sorted(map(int, kill["losses"]["resumed_on_2"])) == [2, 4]  # logged every 2 steps: before and after the kill
    assert "| llama-tiny-elas | ddp |" in r.stdout and "bit-identical True" in r.stdout


def test_multi_gpu_script_refuses_a_bad_stage(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--device", "cpu",
                        "--stages", "scale,bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "bogus" in r.stderr
