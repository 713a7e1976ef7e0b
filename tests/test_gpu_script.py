"""bench/gpu.py --dry-run end to end (CPU, tiny sizes): every step runs and writes its files.

The GPU run (bash bench/gpu.sh) is the same code on CUDA tensors at benchmark sizes; this
keeps it runnable between the rare runs on a lent GPU.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

FAMILIES = ("logprobs", "gae", "ppo", "kl", "dpo")


def test_dry_run(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RLHF_KERNELS_BACKEND"}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    log = f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    # 0: all passed; 1: a test in tests/test_gpu.py failed (a kernel defect the dry run can
    # see is reported, not hidden); 2: a step of the script itself could not run.
    assert done.returncode in (0, 1), log
    for name in ("env.json", "env.md", "tests.log", "tests.xml", "bench.log", "summary.md"):
        assert (tmp_path / name).is_file(), f"no {name}\n{log}"
    env_record = json.loads((tmp_path / "env.json").read_text())
    assert env_record["dry_run"] is True and env_record["torch"] and "rlhf-kernels" in env_record["rlhf_kernels_info"]
    summary = (tmp_path / "summary.md").read_text()
    assert "Dry run on CPU, not GPU figures" in summary.split("\n## ")[0]
    tests_row = next(line for line in summary.splitlines() if line.startswith("| tests |"))
    assert int(tests_row.split("|")[2].split()[0]) > 0, tests_row  # "N passed, ..."
    for family in FAMILIES:
        assert any(line.startswith(f"| bench {family} | ok") for line in summary.splitlines()), family
        csv = tmp_path / f"{family}-cpu-float32-dry-run.csv"
        assert csv.is_file(), f"no {csv.name}"
        section = summary.split(f"### {family} ")[1].split("\n### ")[0]
        assert "| ours:reference |" in section, section


def test_peak_table():
    import gpu

    assert gpu.peak_of("NVIDIA H100 80GB HBM3") == ("H100 SXM", 3350, 989)
    assert gpu.peak_of("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert gpu.peak_of("NVIDIA H200") == ("H200 SXM", 4800, 989)
    assert gpu.peak_of("NVIDIA A100-SXM4-80GB") == ("A100 80GB SXM", 2039, 312)
    assert gpu.peak_of("NVIDIA GeForce RTX 4090") is None
