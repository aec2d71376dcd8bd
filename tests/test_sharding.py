"""FSDP2 on 2 CPU processes (gloo): generation on gathered weights and the GRPO loss equal the unsharded run.

Each rank builds the same tiny policy, computes the unsharded reference (greedy and seeded sampled completions,
log-probs, a GRPO loss with β > 0 and its gradients), then shards a second copy with :func:`shard_policy` and
does it all again: completions generated inside :func:`gathered_parameters` (one all-gather per FSDP unit for
the whole rollout), and, for comparison, generated without it (FSDP's hooks all-gather every unit at every
decoding step). The all-gathers are counted by wrapping ``torch.distributed.all_gather_single``, the collective
FSDP2's default all-gather calls. The same with LoRA adapters on the sharded policy, and a Lightning run with
``ModelParallelStrategy`` (``GRPOModule.configure_model``) against DDP.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_rollout import config, video_batch

from mg3d.generation import completion_logprobs, generate_completions, make_generator
from mg3d.grpo.loss import GRPOLossConfig, grpo_loss
from mg3d.lora import LoRAConfig, adapters_disabled, apply_lora
from mg3d.model import build_tiny_policy
from mg3d.sharding import fsdp_units, gathered_parameters, is_sharded, shard_policy

ROOT = Path(__file__).resolve().parents[1]
#: configs/demo.yaml starts from the shipped pretrained policy (a path relative to the repository); these
#: tests train the tiny random-init model from another working directory
NO_CKPT = "--model.policy.checkpoint=null"
WORLD = 2
NEW_TOKENS = 12


@contextmanager
def counted_all_gathers():
    """Count FSDP2's all-gathers inside the block (its default all-gather calls ``dist.all_gather_single``)."""
    calls = [0]
    original = dist.all_gather_single

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_gather_single = counting
    try:
        yield calls
    finally:
        dist.all_gather_single = original


def _loss_and_grads(policy, batch, rollout, ref_logps) -> tuple[float, dict[str, torch.Tensor]]:
    """A GRPO loss (dapo, β = 0.04, a reference shifted so the KL term is not 0) and every full gradient."""
    cfg = GRPOLossConfig(loss_type="dapo", beta=0.04)
    policy.model.train()
    policy.model.zero_grad(set_to_none=True)
    logps = completion_logprobs(policy, batch, rollout, 1.0)
    advantages = torch.linspace(-0.5, 1.0, logps.shape[0])
    mask = rollout.completion_mask.float()
    shifted = ref_logps - 0.05 * torch.arange(ref_logps.shape[1]) / ref_logps.shape[1]
    loss, _ = grpo_loss(logps, advantages, mask, cfg, ref_logps=shifted, num_items_in_batch=mask.sum())
    loss.backward()
    grads = {}
    for name, param in policy.model.named_parameters():
        grad = param.grad
        if grad is not None:
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad.clone()
    policy.model.eval()
    return float(loss.detach()), grads


def _rollouts(policy, batch, new_tokens: int):
    greedy = generate_completions(policy, batch, config(do_sample=False, max_new_tokens=new_tokens))
    sampled_cfg = config(max_new_tokens=new_tokens)
    sampled = generate_completions(policy, batch, sampled_cfg, generator=make_generator(sampled_cfg.seed))
    return greedy, sampled


def _worker(rank: int, world: int, port: int, out: str, new_tokens: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _compare(rank, new_tokens)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _compare(rank: int, new_tokens: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    plain = build_tiny_policy(initializer_range=0.2, seed=0)
    batch = video_batch(plain)
    greedy, sampled = _rollouts(plain, batch, new_tokens)
    with torch.no_grad():
        ref = completion_logprobs(plain, batch, sampled, 1.0)
    loss, grads = _loss_and_grads(plain, batch, sampled, ref)

    policy = build_tiny_policy(initializer_range=0.2, seed=0)
    units = shard_policy(policy.model, init_device_mesh("cpu", (WORLD,)))
    assert is_sharded(policy.model) and len(fsdp_units(policy.model)) == units
    greedy_cfg = config(do_sample=False, max_new_tokens=new_tokens)
    with counted_all_gathers() as calls:
        start = time.perf_counter()
        per_token = generate_completions(policy, batch, greedy_cfg)
        per_token_seconds = time.perf_counter() - start
    per_token_gathers = calls[0]
    for unit in fsdp_units(policy.model):
        unit.reshard()  # the root unit stays gathered after a forward; start from shards, as a rollout does
    with counted_all_gathers() as calls:
        start = time.perf_counter()
        with gathered_parameters(policy.model):
            s_greedy = generate_completions(policy, batch, greedy_cfg)
        gathered_seconds = time.perf_counter() - start
    greedy_gathers = calls[0]
    with counted_all_gathers() as calls, gathered_parameters(policy.model):
        sampled_cfg = config(max_new_tokens=new_tokens)
        s_sampled = generate_completions(
            policy, batch, sampled_cfg, generator=make_generator(sampled_cfg.seed)
        )
        with torch.no_grad():  # a no-gradient pass: the shared prefill, on the gathered weights
            s_ref = completion_logprobs(policy, batch, s_sampled, 1.0)
    sampled_gathers = calls[0]
    with pytest.warns(UserWarning, match="FSDP-sharded"):
        s_loss, s_grads = _loss_and_grads(policy, batch, s_sampled, s_ref)
    return {
        "rank": rank,
        "units": units,
        "decode_steps": int(greedy.completion_ids.shape[1]),
        "decoder_layers": len(policy.model.model.language_model.layers),
        "greedy_equal": torch.equal(s_greedy.completion_ids, greedy.completion_ids),
        "per_token_equal": torch.equal(per_token.completion_ids, greedy.completion_ids),
        "sampled_equal": torch.equal(s_sampled.completion_ids, sampled.completion_ids),
        "ref_max_diff": float((s_ref - ref).abs().max()),
        "loss": loss,
        "sharded_loss": s_loss,
        "grad_names_equal": sorted(grads) == sorted(s_grads),
        "grad_max_rel_diff": max(
            float((s_grads[n] - g).abs().max()) / max(1.0, float(g.abs().max())) for n, g in grads.items()
        ),
        "per_token_gathers": per_token_gathers,
        "greedy_gathers": greedy_gathers,
        "sampled_gathers": sampled_gathers,
        "per_token_seconds": per_token_seconds,
        "gathered_seconds": gathered_seconds,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_two_processes(out: Path, new_tokens: int = NEW_TOKENS) -> list[dict]:
    """Run the comparison on 2 gloo processes; one result per rank (also used by ``bench/sharded_generation.py``)."""
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out), new_tokens), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(WORLD)]


@pytest.mark.slow
def test_fsdp2_generation_and_loss_equal_the_unsharded_run(tmp_path) -> None:
    for r in run_two_processes(tmp_path):
        assert r["greedy_equal"] and r["sampled_equal"] and r["per_token_equal"], r
        assert r["ref_max_diff"] < 1e-5, r
        assert r["sharded_loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6)
        assert r["grad_names_equal"] and r["grad_max_rel_diff"] < 1e-4, r
        # one all-gather per unit for a whole rollout (greedy; sampled + a no-gradient log-prob pass) ...
        assert r["greedy_gathers"] == r["sampled_gathers"] == r["units"], r
        # ... against one per decoder layer per decoding step without gathering
        assert r["per_token_gathers"] >= r["decoder_layers"] * r["decode_steps"], r


def test_gathering_an_unsharded_model_is_a_no_op() -> None:
    policy = build_tiny_policy()
    assert not is_sharded(policy.model)
    with gathered_parameters(policy.model) as model:
        assert model is policy.model


def _lora_policy():
    """The tiny policy with LoRA adapters, seeded, and B ≠ 0 so the adapters change the outputs."""
    policy = build_tiny_policy(initializer_range=0.2, seed=0)
    torch.manual_seed(0)  # peft draws A from the global generator
    apply_lora(policy.model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if ".lora_B." in name:
                param.fill_(0.01)
    return policy


def _lora_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runs = []
        for sharded in (False, True):
            policy = _lora_policy()
            batch = video_batch(policy)
            if sharded:
                shard_policy(policy.model, init_device_mesh("cpu", (world,)))
            with gathered_parameters(policy.model):
                rollout = generate_completions(
                    policy, batch, config(do_sample=False, max_new_tokens=NEW_TOKENS)
                )
                with torch.no_grad(), adapters_disabled(policy.model):  # the KL reference: the base model
                    ref = completion_logprobs(policy, batch, rollout, 1.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the repeated-prompt fallback under FSDP2
                runs.append((rollout.completion_ids, ref, *_loss_and_grads(policy, batch, rollout, ref)))
        (ids, ref, loss, grads), (s_ids, s_ref, s_loss, s_grads) = runs
        result = {
            "completions_equal": torch.equal(ids, s_ids),
            "ref_max_diff": float((s_ref - ref).abs().max()),
            "loss": loss,
            "sharded_loss": s_loss,
            "only_adapters": sorted(grads) == sorted(s_grads) and all(".lora_" in n for n in s_grads),
            "grad_max_rel_diff": max(
                float((s_grads[n] - g).abs().max()) / max(1.0, float(g.abs().max())) for n, g in grads.items()
            ),
        }
        Path(out, f"lora{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lora_under_fsdp2_equals_the_unsharded_run(tmp_path) -> None:
    """LoRA on a sharded policy: same completions, base-model reference, loss, and adapter-only gradients."""
    mp.spawn(_lora_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        r = json.loads((tmp_path / f"lora{rank}.json").read_text(encoding="utf-8"))
        assert r["completions_equal"] and r["only_adapters"], r
        assert r["ref_max_diff"] < 1e-5, r
        assert r["sharded_loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6)
        assert r["grad_max_rel_diff"] < 1e-4, r


# ---------------------------------------------------------------------------------------------- through Lightning

FSDP2_STRATEGY = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False},
}
# The tiny policy writes ~10 characters per completion: rewarding "at most 10" gives the groups a reward spread,
# so the GRPO steps move the weights (and a difference between the strategies would show).
SPREAD_REWARDS = {"format": {"mode": "lenient", "sanity_weight": 1.0, "min_think_chars": 0, "max_chars": 10}}


def _train(phantoms: str, root: Path, strategy: str, *extra: str) -> dict[str, torch.Tensor]:
    """``scripts/train.py fit`` on 2 CPU processes: 2 warm-start + 2 GRPO steps (β > 0); the final weights."""
    import subprocess
    import sys

    source = {"path": phantoms, "synthetic": None, "pipeline": {"spatial_size": [28, 28, 8]}}
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", str(ROOT / "configs" / "demo.yaml"), NO_CKPT,
        "--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.strategy={strategy}",
        "--trainer.max_steps=4", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--model.warm_start.steps=2", "--model.steps_per_generation=1", "--model.rollout.num_generations=4",
        "--model.rollout.max_new_tokens=12", "--model.prompt.max_vision_tokens=32", "--model.loss.beta=0.04",
        f"--model.rewards={json.dumps(SPREAD_REWARDS)}", "--model.evaluation.enabled=false",
        "--model.log_completions_every_n_steps=0", f"--data.sources=[{json.dumps(source)}]", "--data.batch_size=2",
        *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    done = subprocess.run(cmd, cwd=root.parent, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    return checkpoint["state_dict"]


@pytest.mark.slow
@pytest.mark.e2e
def test_fsdp2_through_lightning_trains_as_ddp(phantom_source, tmp_path) -> None:
    """``ModelParallelStrategy`` (FSDP2 via ``GRPOModule.configure_model``, with gradient checkpointing) and DDP,
    both on 2 gloo processes, end with the same weights; the FSDP run's checkpoint (one full file) serves the
    Grounder."""
    from mg3d.grounder import Grounder

    fsdp = _train(
        phantom_source.path,
        tmp_path / "fsdp",
        json.dumps(FSDP2_STRATEGY),
        "--model.policy.gradient_checkpointing=true",
    )
    ddp = _train(phantom_source.path, tmp_path / "ddp", "ddp")
    assert fsdp.keys() == ddp.keys()
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=0, atol=1e-5, msg=key)
    grounder = Grounder.from_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    assert not is_sharded(grounder.policy.model)
