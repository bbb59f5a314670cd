"""A fingerprint of a base model: which architecture and which tokenizer, not which weights.

The rollout server reports it in `Status.model_fingerprint`; the learner compares it with its own
student's before the first push, so a server started on another model (the teacher, say) is refused
before anything is pushed to it. Hashing the weights would take minutes for a 7B model; the config
and the tokenizer already tell two different models apart (layers, widths, vocabulary).

Exactly what is hashed, in this order (a file that is absent is skipped, and its name is not hashed):

* ``config.json``, parsed and re-serialised with sorted keys, without the keys that say how or where
  the model was saved rather than what it is: ``_name_or_path``, ``transformers_version``,
  ``torch_dtype``, ``dtype`` and ``_commit_hash`` (the same model saved in bf16 by another
  transformers version has the same fingerprint);
* the tokenizer files ``tokenizer.json``, ``tokenizer.model``, ``vocab.json``, ``merges.txt``,
  ``vocab.txt``, ``added_tokens.json``, ``special_tokens_map.json``, ``tokenizer_config.json``
  (JSON ones canonicalised the same way, also without ``name_or_path``); other files are raw bytes.

Each present file contributes its name, a NUL, its length and its (canonical) bytes. A path that is
not a local directory (a hub id not in the local cache) or that holds none of these files gives "".

Standard library only (plus huggingface_hub, lazily, for hub ids): the server, the learner and the
Ray job all import it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
# Keys that record how or where a model was saved, not what it is.
_VOLATILE_KEYS = frozenset(
    {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}
)


def model_fingerprint(path: str | Path) -> str:
    """sha256 hex over the model's config and tokenizer files (see the module docstring), or ""."""
    root = _local_dir(str(path))
    if root is None:
        return ""
    h, found = hashlib.sha256(), False
    for name in (CONFIG_FILE, *TOKENIZER_FILES):
        f = root / name
        if not f.is_file():
            continue
        data = _canonical(f)
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
        found = True
    return h.hexdigest() if found else ""


def short(fingerprint: str) -> str:
    """The first 12 hex digits, for messages ("" shows as "none")."""
    return fingerprint[:12] if fingerprint else "none"


def _canonical(f: Path) -> bytes:
    raw = f.read_bytes()
    if f.suffix != ".json":
        return raw
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in _VOLATILE_KEYS}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _local_dir(path: str) -> Path | None:
    """The model's directory: `path` itself, or a hub id's snapshot in the local cache (no download)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download  # optional; only hub ids need it
    except ImportError:
        return None
    try:
        got = snapshot_download(path, local_files_only=True, allow_patterns=[CONFIG_FILE, *TOKENIZER_FILES])
    except Exception:  # noqa: BLE001 - not cached, not a repo id, offline: no fingerprint
        return None
    return Path(got)
