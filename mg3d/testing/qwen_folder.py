"""A real-architecture Qwen2.5-VL checkpoint folder, built offline: the real tokenizer, small random weights.

Why: every other test runs the tiny policy with mg3d's byte-level tokenizer, which hides whatever differs from
how a released Qwen2.5-VL-Instruct folder is laid out (151,936-row vocabulary, special tokens at 151643–151656,
multi-digit BPE merges, the 3B vision geometry with ``tokens_per_second = 2``, a generation config that sets a
repetition penalty, a chat template kept in ``chat_template.json``). This module writes such a folder from public
facts only:

* the tokenizer: the 151,643 byte-level BPE ranks of Qwen (``qwen.tiktoken``, shipped in the ``qwen-agent``
  wheel, which the Makefile installs with ``--no-deps``) turned into a fast tokenizer by transformers' tiktoken converter, with Qwen2's
  pre-tokenizer rule (one token per digit) and the 14 special tokens at their public ids;
* the model: the Qwen2.5-VL-3B vision geometry (patch 14, merge 2, temporal patch 2, window 112,
  ``tokens_per_second = 2``) and text rotary layout (head dim 128, mrope sections 16/24/24), but few and
  narrow layers, so a forward over a real vocabulary stays cheap on a CPU;
* the Instruct-style ``generation_config.json`` (sampling defaults and ``repetition_penalty = 1.05``) and the
  image processor's pixel limits (``min_pixels`` 56², ``max_pixels`` 12,845,056).

:func:`real_architecture_folder` builds it once into a cache folder keyed by a hash of everything that goes in
(written to a temporary name, then renamed), so a test session, the cluster rehearsal and the decoding bench
pay the ~5 s build once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import AddedToken, normalizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig
from transformers import Qwen2_5_VLForConditionalGeneration as _Qwen25VL
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mg3d.chat_template import QWEN2_VL_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS
from mg3d.errors import ConfigError

__all__ = [
    "QWEN_FIRST_SPECIAL_ID",
    "QWEN_VOCAB_SIZE",
    "FolderSpec",
    "build_qwen_tokenizer",
    "qwen_ranks_path",
    "real_architecture_folder",
    "write_real_architecture_folder",
]

#: Rows of the released Qwen2.5-VL embedding (the 151,643 BPE ranks + specials, padded).
QWEN_VOCAB_SIZE = 151936
#: Id of ``<|endoftext|>``; the other special tokens follow in :data:`mg3d.chat_template.QWEN_SPECIAL_TOKENS` order.
QWEN_FIRST_SPECIAL_ID = 151643
#: Qwen2's pre-tokenizer split (as tiktoken's cl100k rule, but ``\p{N}`` alone: one token per digit).
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_BUILDER_VERSION = 1
_DONE_MARKER = ".mg3d-folder-complete"


def qwen_ranks_path() -> Path:
    """``qwen.tiktoken`` inside the installed ``qwen-agent`` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("qwen_agent")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the Qwen BPE ranks come from the 'qwen-agent' package (qwen_agent/utils/qwen.tiktoken); "
            "install it without its dependencies: pip install --no-deps -c requirements/lock.txt qwen-agent"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "qwen.tiktoken"
    if not path.is_file():
        raise ConfigError(f"{path}: qwen-agent is installed but ships no qwen.tiktoken")
    return path


def build_qwen_tokenizer(ranks: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2 / Qwen2.5 fast tokenizer from the tiktoken ranks, with the special tokens at their public ids.

    End of turn (EOS) is ``<|im_end|>``, padding ``<|endoftext|>``, no BOS, as in the Instruct checkpoints.
    """
    path = Path(ranks) if ranks is not None else qwen_ranks_path()
    backend = TikTokenConverter(vocab_file=str(path), pattern=QWEN_PRETOKENIZE_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    # Added first, in order, so they take ids 151643, 151644, … whatever order the wrapper registers them in.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    if backend.get_vocab_size() != QWEN_FIRST_SPECIAL_ID + len(QWEN_SPECIAL_TOKENS):
        raise ConfigError(
            f"{path}: {backend.get_vocab_size() - len(QWEN_SPECIAL_TOKENS)} BPE ranks, expected "
            f"{QWEN_FIRST_SPECIAL_ID} (Qwen's vocabulary)"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != QWEN_FIRST_SPECIAL_ID + offset:
            raise ConfigError(
                f"special token {token} got id {got}, expected {QWEN_FIRST_SPECIAL_ID + offset}"
            )
    tokenizer.padding_side = "left"
    return tokenizer


@dataclass(frozen=True)
class FolderSpec:
    """Sizes of the small model; the geometry that matters for inputs is the released 3B one."""

    hidden_size: int = 128  # one head of 128: the released head dim, so the real mrope sections apply
    num_heads: int = 1
    num_kv_heads: int = 1
    intermediate_size: int = 256
    num_layers: int = 2
    vision_depth: int = 2
    vision_hidden: int = 128
    vision_heads: int = 2
    vision_intermediate: int = 256
    tokens_per_second: int = 2
    repetition_penalty: float = 1.05
    seed: int = 0


def _model_config(spec: FolderSpec) -> Qwen2_5_VLConfig:
    special = {tok: QWEN_FIRST_SPECIAL_ID + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
    text = {
        "vocab_size": QWEN_VOCAB_SIZE,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "pad_token_id": special["<|endoftext|>"],
    }
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_heads": spec.vision_heads,
        "in_channels": 3,
        "out_hidden_size": spec.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "tokens_per_second": spec.tokens_per_second,
        "fullatt_block_indexes": [spec.vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _generation_config(spec: FolderSpec) -> GenerationConfig:
    """What Qwen2.5-VL-Instruct folders ship: near-greedy sampling defaults and a repetition penalty."""
    return GenerationConfig(
        bos_token_id=QWEN_FIRST_SPECIAL_ID,
        pad_token_id=QWEN_FIRST_SPECIAL_ID,
        eos_token_id=[QWEN_FIRST_SPECIAL_ID + 2, QWEN_FIRST_SPECIAL_ID],
        do_sample=True,
        repetition_penalty=spec.repetition_penalty,
        temperature=0.1,
        top_p=0.001,
        top_k=1,
    )


def write_real_architecture_folder(folder: str | Path, spec: FolderSpec = FolderSpec()) -> Path:
    """Write the folder (weights, tokenizer, ``chat_template.json``, preprocessor and generation configs)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = _Qwen25VL._from_config(_model_config(spec), dtype=torch.float32)
    model.generation_config = _generation_config(spec)
    model.save_pretrained(str(out), safe_serialization=True)
    build_qwen_tokenizer().save_pretrained(str(out))
    # The template lives in the processor's chat_template.json (as in released folders), not the tokenizer's.
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2) + "\n", encoding="utf-8"
    )
    Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2
    ).save_pretrained(str(out))
    return out


def _cache_key(spec: FolderSpec) -> str:
    ranks = qwen_ranks_path()
    payload: dict[str, Any] = {
        "spec": asdict(spec),
        "ranks_bytes": ranks.stat().st_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "builder": _BUILDER_VERSION,
        "template": hashlib.sha256(QWEN2_VL_CHAT_TEMPLATE.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def real_architecture_folder(cache_dir: str | Path | None = None, spec: FolderSpec = FolderSpec()) -> Path:
    """The cached folder for ``spec``, built on first use (``cache_dir`` defaults to ``$TMPDIR/mg3d-fixtures``)."""
    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "mg3d-fixtures"
    target = root / f"qwen2_5_vl-real-arch-{_cache_key(spec)}"
    if (target / _DONE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        write_real_architecture_folder(scratch, spec)
        (scratch / _DONE_MARKER).write_text("ok\n", encoding="utf-8")
        try:
            os.replace(scratch, target)
        except OSError:  # another process finished first (target exists and is not empty): use theirs
            if not (target / _DONE_MARKER).is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target
