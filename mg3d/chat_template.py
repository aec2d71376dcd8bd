"""A Qwen2-VL style chat template and an offline byte-level Qwen2 tokenizer.

Why this exists: the tiny default policy and the tests need a real ``Qwen2Tokenizer`` and a real chat
template without any file or hub access. The tokenizer is the genuine transformers class, built from the
256 byte-level symbols (so it is lossless on any UTF-8 text) plus Qwen's special tokens, with no merges.
The template renders conversations the way Qwen2-VL / Qwen2.5-VL checkpoints expect (``<|im_start|>``
turns, one ``<|vision_start|><|image_pad|><|vision_end|>`` placeholder per image and
``<|vision_start|><|video_pad|><|vision_end|>`` per video; the processor later expands each pad to the
number of vision tokens). It is our own text, written to produce that layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer

from mg3d.errors import ConfigError

#: Qwen2-VL's special tokens (same spelling as the released checkpoints), in the order they get ids.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: Jinja chat template in the Qwen2-VL layout. A system turn with the default prompt is added when the
#: conversation does not start with one; ``content`` may be a string or a list of typed parts
#: (``{"type": "image"}``, ``{"type": "video"}``, ``{"type": "text", "text": ...}``).
QWEN2_VL_CHAT_TEMPLATE: str = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def byte_level_vocab(extra_tokens: Sequence[str] = ()) -> dict[str, int]:
    """Vocabulary: the 256 byte-level symbols (ids 0–255, sorted), then Qwen's special tokens, then extras."""
    symbols = sorted(ByteLevel.alphabet())
    if len(symbols) != 256:  # a tokenizers release that changed the alphabet would break id stability
        raise ConfigError(f"expected 256 byte-level symbols from tokenizers, got {len(symbols)}")
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    for token in (*QWEN_SPECIAL_TOKENS, *extra_tokens):
        if token in vocab:
            raise ConfigError(
                f"token {token!r} is listed twice (or is a single byte symbol) in the vocabulary"
            )
        vocab[token] = len(vocab)
    return vocab


def build_byte_level_tokenizer(
    *, extra_tokens: Sequence[str] = (), chat_template: str = QWEN2_VL_CHAT_TEMPLATE
) -> Qwen2Tokenizer:
    """Build a ``Qwen2Tokenizer`` in memory: byte-level symbols, no merges, Qwen special tokens.

    ``extra_tokens`` (e.g. ``("<think>", "</think>", "<answer>", "</answer>")``) become single, *non-special*
    tokens, so they shorten sequences for the tiny model yet survive ``decode(skip_special_tokens=True)``.
    ``<|im_end|>`` is the end-of-turn (EOS) token and ``<|endoftext|>`` the padding token, as in Qwen's
    instruct checkpoints.
    """
    extra = tuple(extra_tokens)
    for token in extra:
        if not isinstance(token, str) or not token:
            raise ConfigError(f"extra token {token!r} must be a non-empty string")
    vocab = byte_level_vocab(extra)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    # Tokens that are only in the vocab are split into bytes by the BPE model; registering them as added
    # tokens makes the tokenizer match them whole (ids are taken from the vocab, not appended).
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True
    )
    if extra:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    if len(tokenizer) != len(vocab):
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    tokenizer.chat_template = chat_template
    return tokenizer
