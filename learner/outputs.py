"""What a finished run leaves in output_dir: the adapter, optionally a merged model, a model card.

* `adapter_config.json` + `adapter_model.safetensors` (+ tokenizer) at the root: loads with
  `PeftModel.from_pretrained(base, output_dir)`;
* without --use_peft (full fine-tuning): the whole model in `model/` (loads in AutoModelForCausalLM);
* `merged/` with `--save_merged`: a plain transformers model (loads in AutoModelForCausalLM and as
  a rollout server / vLLM base model);
* `README.md`: a model card with the run's config, final figures and the GKD citation.
`--push_to_hub` uploads all of it. `check_hub` runs at start, before any model loads: no token, a
read-only token, an unreachable hub or a namespace the token cannot write to is one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from learner.errors import UserError
from shared.config import Config, to_dict

log = logging.getLogger("gkd.learner")

CITATION = """@inproceedings{agarwal2024on-policy,
    title        = {{On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes}},
    author       = {Rishabh Agarwal and Nino Vieillard and Yongchao Zhou and Piotr Stanczyk and Sabela Ramos Garea and Matthieu Geist and Olivier Bachem},
    year         = 2024,
    booktitle    = {The Twelfth International Conference on Learning Representations, {ICLR} 2024, Vienna, Austria, May 7-11, 2024},
    publisher    = {OpenReview.net},
    url          = {https://openreview.net/forum?id=3zKtaqxLhW},
    note         = {arXiv:2306.13649},
}"""


def save_adapter(student, tokenizer, out: Path) -> Path:
    """The trained weights: the adapter at the root (--use_peft), else the full model in
    output_dir/model (the root's config.json is the run's resolved config); returns where."""
    where = out if hasattr(student, "peft_config") else out / "model"
    student.save_pretrained(str(where), safe_serialization=True)
    tokenizer.save_pretrained(str(where))
    return where


def save_merged(student, tokenizer, out: Path) -> Path:
    """Merge the LoRA into the base weights and save a plain model. Consumes `student`: call last."""
    # Full fine-tuning (no PEFT): the model is already whole.
    merged = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    path = out / "merged"
    merged.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def write_model_card(cfg: Config, out: Path, final: dict[str, Any]) -> Path:
    m, d = cfg.model, cfg.data
    figures = "\n".join(
        f"| {k} | {v:.4g} |"
        for k, v in sorted(final.items())
        if isinstance(v, (int, float)) and v is not None
    )
    card = f"""---
base_model: {m.model_name_or_path}
library_name: {"peft" if cfg.lora.use_peft else "transformers"}
tags:
- gkd
- knowledge-distillation
- {"lora" if cfg.lora.use_peft else "full-fine-tuning"}
- gkd-service
---

# {out.name}

{"A LoRA adapter for" if cfg.lora.use_peft else "A fully fine-tuned"} `{m.model_name_or_path}`, distilled from `{m.teacher_model_name_or_path}` on
`{d.dataset_name}` with on-policy generalized knowledge distillation (GKD, Agarwal et al., ICLR 2024,
[arXiv:2306.13649](https://arxiv.org/abs/2306.13649)) by gkd-service: a vLLM rollout server sampled
the student while the learner trained on the generalized JSD (beta={cfg.gkd.beta}) to the teacher,
with a share lmbda={cfg.gkd.lmbda} of on-policy micro-batches.

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{m.model_name_or_path}")
model = PeftModel.from_pretrained(base, "{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```
{"A merged copy is in `merged/`." if cfg.train.save_merged else ""}

## Final figures

| metric | value |
|---|---|
{figures}

## Training configuration

```json
{json.dumps(to_dict(cfg), indent=2, sort_keys=True)}
```

## Citation

```bibtex
{CITATION}
```
"""
    path = out / "README.md"
    path.write_text(card)
    return path


def check_hub(cfg: Config, out: Path) -> str:
    """Fail fast on a --push_to_hub that could never succeed; return the full target repo id."""
    from huggingface_hub import HfApi, get_token

    repo = cfg.train.hub_model_id or out.resolve().name
    token = cfg.train.hub_token or get_token()
    if not token:
        raise UserError(
            f"--push_to_hub to {repo!r}: no Hugging Face token (set HF_TOKEN or run `hf auth login`), "
            "or drop --push_to_hub"
        )
    try:
        me = HfApi(token=token).whoami()
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all end the same way
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"--push_to_hub to {repo!r}: the hub does not accept the token ({first})") from None
    user = me.get("name", "")
    repo = repo if "/" in repo else f"{user}/{repo}"
    access = (me.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise UserError(f"--push_to_hub to {repo!r}: the token is read-only; use a token with write access")
    namespaces = {user, *(o.get("name") for o in me.get("orgs") or [])}
    if repo.split("/")[0] not in namespaces:
        raise UserError(
            f"--push_to_hub to {repo!r}: the token ({user}) cannot write to namespace {repo.split('/')[0]!r}; "
            "set --hub_model_id to a repo of yours"
        )
    return repo


def push_to_hub(cfg: Config, out: Path, repo: str | None = None) -> None:
    """Upload output_dir; UserError (everything already saved locally) when it cannot."""
    repo = repo or cfg.train.hub_model_id or out.resolve().name
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=cfg.train.hub_token)  # None: HF_TOKEN / the cached login
        api.create_repo(repo, exist_ok=True, private=cfg.train.hub_private_repo)
        api.upload_folder(
            folder_path=str(out), repo_id=repo, ignore_patterns=["checkpoints/*", "runs/*", "*.tmp"]
        )
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all end the same way
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(
            f"push_to_hub to {repo!r} failed ({first}); everything is saved locally in {out}"
        ) from None
    log.info("pushed %s to the hub as %s", out, repo)


@contextlib.contextmanager
def disk_errors_as_oserror(path: Path):
    """safetensors reports a full disk as its own SafetensorError ("... (os error 28)"); re-raise it
    as the OSError it is, so the process edge gives its one line (free space, --resume latest)."""
    try:
        yield
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if type(e).__name__ != "SafetensorError" or code is None:
            raise
        n = int(code.group(1))
        raise OSError(n, os.strerror(n), str(path)) from None
