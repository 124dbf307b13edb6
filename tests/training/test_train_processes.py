"""Multi-process behaviour of training: DDP with gloo on two CPU processes, and SIGKILL + --resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipdalle import checkpoint

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_see_different_data_and_end_identical(shapes_folder, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(HERE / "ddp_script.py"), str(shapes_folder), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = [json.loads((tmp_path / f"keys_{rank}.json").read_text()) for rank in (0, 1)]
    assert keys[0]["world"] == keys[1]["world"] == 2
    # 32 images, 16 per rank per epoch: the 16 keys each rank saw in 4 steps of 4 are disjoint.
    assert len(keys[0]["keys"]) == len(keys[1]["keys"]) == 16
    assert not set(keys[0]["keys"]) & set(keys[1]["keys"])
    weights = [torch.load(tmp_path / f"weights_{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert checkpoint.checkpoint_step(tmp_path / "run") == 4


def run_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "clipdalle.cli", *args], **kwargs)


def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(shapes_folder, tmp_path):
    common = [
        "train", "vae", "--data", str(shapes_folder), "--preset", "tiny", "--image-size", "16",
        "--steps", "300", "--save-every", "40", "--eval-every", "1000", "--log-every", "20", "--num-workers", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = run_cli([*common, "--out", str(tmp_path / "full")], env=env, stderr=subprocess.PIPE)
    assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]

    killed_dir = tmp_path / "killed"
    process = run_cli([*common, "--out", str(killed_dir)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed_dir / "model.safetensors").exists() and (checkpoint.checkpoint_step(killed_dir) or 0) >= 80:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step_at_kill = checkpoint.checkpoint_step(killed_dir)
    assert step_at_kill is not None and step_at_kill < 300, "the run finished before it could be killed"
    # Nothing the kill left behind is corrupt.
    json.loads((killed_dir / "config.json").read_text())
    load_file(killed_dir / "model.safetensors")
    checkpoint.load_train_state(killed_dir)

    resumed = run_cli([*common, "--out", str(killed_dir), "--resume"], env=env, stderr=subprocess.PIPE)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    expected = load_file(tmp_path / "full" / "model.safetensors")
    actual = load_file(killed_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
