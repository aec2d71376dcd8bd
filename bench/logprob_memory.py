#!/usr/bin/env python
"""Peak memory of the GRPO log-prob pass at Qwen2.5-VL's 151,936-row vocabulary: one pass vs the chunked head.

Run by hand (writes its section of docs/benchmarks.md unless --no-write)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/logprob_memory.py

The model is the real-architecture Qwen2.5-VL folder of :mod:`mg3d.testing` (real vocabulary and vision geometry,
two narrow layers), so the output head — ``[tokens, 151,936]`` logits, their log-softmax and entropy — is what
dominates, as it does for the released models at the paper's G = 8 × 256 completion tokens. One prompt (one
image) and a rollout of G completions of T tokens (random ids, all unmasked: the memory does not depend on which
tokens) go through ``completion_logprobs`` with the entropy and a backward pass, in train mode, as in a GRPO
step. Each setting runs in a fresh process; its peak is the kernel's high-water mark (``VmHWM``) reset just
before the pass, and is reported above the resident set at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Log-prob pass memory at the real vocabulary (`bench/logprob_memory.py`)"


def _status_mb() -> dict[str, float]:
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M))
    return {"rss_mb": int(fields["VmRSS"]) / 1024, "peak_mb": int(fields["VmHWM"]) / 1024}


def child(chunk_elements: int | None, generations: int, tokens: int) -> dict[str, Any]:
    """One log-prob pass (forward with entropy + backward) in this process; its peak over the resident set."""
    import numpy as np
    import torch

    from mg3d.generation import Rollout, completion_logprobs
    from mg3d.model import load_policy
    from mg3d.testing import real_architecture_folder

    torch.manual_seed(0)
    policy = load_policy(real_architecture_folder(), dtype=torch.float32)
    image = np.random.default_rng(0).integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    pix = policy.processor(images=[image], return_tensors="pt")
    span = policy.vision_span(pix["image_grid_thw"][0], "image")
    head = policy.tokenizer("<|im_start|>user\n").input_ids
    tail = policy.tokenizer("Find the nodule.<|im_end|>\n<|im_start|>assistant\n").input_ids
    ids = head + span.token_ids + tail
    types = [0] * len(head) + span.mm_token_type_ids + [0] * len(tail)
    inputs = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([types]),
        **pix,
    }
    completion = torch.randint(0, 151643, (generations, tokens))
    rollout = Rollout(
        prompt_ids=inputs["input_ids"],
        prompt_mask=inputs["attention_mask"],
        completion_ids=completion,
        completion_mask=torch.ones_like(completion),
        texts=[""] * generations,
        is_truncated=torch.zeros(generations, dtype=torch.bool),
        prompt_index=torch.zeros(generations, dtype=torch.long),
        num_generations=generations,
    )
    policy.model.train()
    before = _status_mb()["rss_mb"]
    Path("/proc/self/clear_refs").write_text("5")  # a new high-water mark: this pass's peak alone
    start = time.perf_counter()
    logp, entropy = completion_logprobs(
        policy, inputs, rollout, 1.0, with_entropy=True, chunk_elements=chunk_elements
    )
    (logp.sum() / logp.numel()).backward()
    seconds = time.perf_counter() - start
    status = _status_mb()
    return {
        "chunk_elements": chunk_elements,
        "rss_before_mb": before,
        "peak_mb": status["peak_mb"],
        "pass_peak_mb": status["peak_mb"] - before,
        "seconds": seconds,
        "mean_logp": float(logp.detach().mean()),
        "mean_entropy": float(entropy.mean()),
        "vocab": int(policy.model.config.get_text_config().vocab_size),
    }


def run_child(chunk: str, generations: int, tokens: int) -> dict[str, Any]:
    """``chunk``: ``"None"`` (one pass), ``"default"`` or a number of logit elements."""
    cmd = [sys.executable, __file__, "--child", "--chunk", chunk, "--g", str(generations)]
    cmd += ["--tokens", str(tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_section(rows: list[dict[str, Any]], generations: int, tokens: int) -> None:
    from mg3d.generation.logprobs import DEFAULT_CHUNK_ELEMENTS

    one, chunked = rows
    vocab = one["vocab"]
    logits_mb = generations * tokens * vocab * 4 / 2**20
    per_chunk = DEFAULT_CHUNK_ELEMENTS // vocab
    block = "\n".join(
        [
            SECTION,
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()} (one torch thread; other jobs shared the machine, so times are indicative). "
            "Command: `OMP_NUM_THREADS=1 .venv/bin/python "
            "bench/logprob_memory.py`. A fresh process per row; peak = the kernel's high-water mark (`VmHWM`) "
            "during one `completion_logprobs` pass (entropy included) and its backward, above the resident set "
            "just before it. Model: the real-architecture Qwen2.5-VL folder of `mg3d.testing` "
            f"({vocab:,}-row vocabulary, 2 narrow layers), one image prompt, G = {generations} completions × "
            f"{tokens} tokens (one `[tokens, vocabulary]` float32 tensor is {logits_mb:,.0f} MB).",
            "",
            "| output head | pass peak over RSS | process peak | time | mean log-prob | mean entropy |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| one pass (`chunk_elements=None`, before) | {one['pass_peak_mb']:,.0f} MB | {one['peak_mb']:,.0f} MB"
            f" | {one['seconds']:.1f} s | {one['mean_logp']:.6f} | {one['mean_entropy']:.6f} |",
            f"| chunked (default, {per_chunk} tokens a chunk, after) | {chunked['pass_peak_mb']:,.0f} MB | "
            f"{chunked['peak_mb']:,.0f} MB | {chunked['seconds']:.1f} s | {chunked['mean_logp']:.6f} | "
            f"{chunked['mean_entropy']:.6f} |",
            "",
            f"Chunked / one pass: **{chunked['pass_peak_mb'] / one['pass_peak_mb']:.2f}×** the pass's peak memory, "
            f"{chunked['seconds'] / one['seconds']:.2f}× its time (the head is recomputed in the backward pass). "
            "The numbers agree to float32 rounding (`tests/test_logprobs_chunked.py`: log-probs, entropies and "
            "gradients); batches that fit one chunk, as every tiny-model batch does, run the one-pass code itself.",
            "",
        ]
    )
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", flags=re.DOTALL | re.MULTILINE)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--g", type=int, default=8, help="completions per prompt (the paper's G)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per completion (the paper's limit)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from mg3d.generation.logprobs import DEFAULT_CHUNK_ELEMENTS

        named = {"None": None, "default": DEFAULT_CHUNK_ELEMENTS}
        chunk = named[args.chunk] if args.chunk in named else int(args.chunk)
        print(json.dumps(child(chunk, args.g, args.tokens)))
        return 0
    rows = [run_child("None", args.g, args.tokens), run_child("default", args.g, args.tokens)]
    for row in rows:
        print(json.dumps(row))
    if not args.no_write:
        write_section(rows, args.g, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
