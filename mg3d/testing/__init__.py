"""Builders of realistic test fixtures (no network): a real-architecture Qwen2.5-VL folder with the real tokenizer.

Reused by the test suite, the cluster rehearsal and the decoding bench, so it lives in the package (policy layer:
it builds what :func:`mg3d.model.load_policy` reads).
"""

from mg3d.testing.qwen_folder import (
    QWEN_FIRST_SPECIAL_ID,
    QWEN_VOCAB_SIZE,
    FolderSpec,
    build_qwen_tokenizer,
    qwen_ranks_path,
    real_architecture_folder,
    write_real_architecture_folder,
)

__all__ = [
    "QWEN_FIRST_SPECIAL_ID",
    "QWEN_VOCAB_SIZE",
    "FolderSpec",
    "build_qwen_tokenizer",
    "qwen_ranks_path",
    "real_architecture_folder",
    "write_real_architecture_folder",
]
