"""A fingerprint of a tokenizer's vocabulary, so two processes can tell they tokenize alike.

A remote teacher sends top-k token ids; they mean the same tokens to the learner only if both
tokenizers map every token to the same id. Hashing the token -> id map itself (not the tokenizer
files) makes the check independent of how the files were saved (chat templates, model_max_length,
transformers version), while any changed, added or renumbered token changes it. The end-of-sequence
id is hashed too: it decides where completions stop.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex over the sorted (token, id) pairs and the eos id of a HF-style tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
