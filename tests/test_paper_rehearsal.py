"""The paper configs rehearsed on 2 CPU processes with a real-architecture Qwen2.5-VL folder (issue 21).

Each ``configs/paper/*.yaml`` runs as written — G = 8, 256 completion tokens, β = 0.04, the Chain-of-Box prompt,
format + IoU + semantic rewards, gradient checkpointing — changing only what a CPU requires (accelerator,
devices, FSDP2 instead of DeepSpeed, fp32 instead of bf16, sdpa instead of flash attention), the model path
(the real-tokenizer folder of :mod:`mg3d.testing`: 151,936-row vocabulary, 3B vision geometry, narrow layers),
step counts and data paths (phantoms). One optimiser step, a checkpoint, a resumed second step with a
validation batch, then the Grounder from the checkpoint scores a test record through ``scripts/evaluate.py``.
Cost: about 8–15 minutes per config on a 2-core machine (the real vocabulary at G = 8 × 256 tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
FSDP2 = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False},
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def _fit(config: Path, folder: Path, phantoms: str, root: Path, max_steps: int, *extra: str) -> None:
    source = {"path": phantoms, "synthetic": None, "pipeline": {"spatial_size": [28, 28, 8]}}
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", str(config),
        # what a CPU requires
        "--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.strategy={json.dumps(FSDP2)}",
        "--trainer.precision=32-true", "--model.policy.dtype=float32", "--model.policy.attn_implementation=null",
        # the model path, step counts and data paths
        f"--model.policy.checkpoint={folder}", f"--trainer.max_steps={max_steps}", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        f"--data.sources=[{json.dumps(source)}]", "--data.num_workers=0", "--data.cache=memory",
        "--data.cache_dir=null", *extra,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=root.parent, env=ENV, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("config", PAPER, ids=lambda p: p.stem)
def test_paper_config_rehearsal(config: Path, qwen_folder: Path, phantom_source, tmp_path: Path) -> None:
    root = tmp_path / "run"
    last = root / "checkpoints" / "last.ckpt"
    _fit(config, qwen_folder, phantom_source.path, root, 1)
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["global_step"] == 1
    _fit(config, qwen_folder, phantom_source.path, root, 2, "--ckpt_path", "last")
    second = torch.load(last, map_location="cpu", weights_only=False)
    assert second["global_step"] == 2
    assert second["hyper_parameters"]["policy"]["checkpoint"] == str(qwen_folder)
    # the resumed run continued from the restored AdamW state (random weights earn no reward, so with β > 0 and
    # the policy equal to its reference the weights themselves need not move in two steps)
    assert {float(v["step"]) for v in first["optimizer_states"][0]["state"].values()} == {1.0}
    assert {float(v["step"]) for v in second["optimizer_states"][0]["state"].values()} == {2.0}

    manifest = Path(phantom_source.path) / "test.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--ckpt", str(last), "--manifest", str(manifest),
         "--limit", "1", "--no-progress", "--bootstrap", "0", "--json"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]["n"] == 1
