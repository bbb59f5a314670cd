"""Training prompts: load, template, tokenize, and hand them out in a resumable order.

Reads a hub dataset (`datasets.load_dataset`) or a local .json/.jsonl/.parquet file or directory, in
one of three shapes:

* conversational ``messages``: the last assistant turn is the completion, the turns before it the prompt;
* ``prompt`` + ``completion``: plain strings or lists of chat messages;
* ``prompt`` only: there is no teacher-written completion; the learner asks the teacher for one.

Templates come from the student's tokenizer; a plain-text prompt is wrapped as one user message when
the tokenizer has a chat template. The module knows nothing about models or the rollout server.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from learner.errors import UserError
from shared.config import Config

log = logging.getLogger("gkd.learner")

SHAPES = ("messages", "prompt_completion", "prompt_only")


@dataclass
class Example:
    prompt_ids: list[int]  # chat-templated prompt, ends where the completion starts
    completion_ids: list[int] | None  # teacher-written (dataset) completion ending in eos; None: prompt-only
    prompt_text: str  # the templated prompt, for logs and samples.jsonl


@dataclass
class DataReport:
    shape: str  # one of SHAPES
    rows: int  # rows in the train split as loaded
    train: int  # prompts trained on
    eval: int  # prompts evaluated on
    eval_source: str  # "split:<name>", "held-out" or "none"
    overlong: int  # prompts over max_prompt_length (train and eval)
    overlong_action: str  # "skip" or "truncate"
    max_prompt_length: int

    def line(self) -> str:
        verb = "skipped" if self.overlong_action == "skip" else "truncated"
        return (
            f"data: {self.rows} rows ({self.shape}); {self.train} train prompts, {self.eval} eval prompts "
            f"({self.eval_source}); {self.overlong} prompts over max_prompt_length={self.max_prompt_length} {verb}"
        )


@dataclass
class Data:
    train: list[Example]
    eval: list[Example]
    report: DataReport


def max_prompt_length(cfg: Config) -> int:
    return cfg.data.max_prompt_length or cfg.data.max_length - cfg.gkd.max_new_tokens


def load_data(cfg: Config, tokenizer, need_eval: bool) -> Data:
    splits = read_splits(cfg)
    d = cfg.data
    if d.dataset_train_split not in splits:
        raise UserError(
            f"dataset {d.dataset_name!r} has no split {d.dataset_train_split!r} (it has {sorted(splits)}); set --dataset_train_split"
        )
    rows = splits[d.dataset_train_split]
    if not rows:
        raise UserError(f"dataset {d.dataset_name!r} split {d.dataset_train_split!r} is empty")
    shape = detect_shape(rows[0].keys(), d.dataset_name)
    limit = max_prompt_length(cfg)
    train, over_train = to_examples(rows, shape, tokenizer, limit, d.max_length, d.overlong_prompts)
    if not train:
        raise UserError(
            f"all {len(rows)} prompts are longer than max_prompt_length={limit} tokens; raise --max_length or use --overlong_prompts truncate"
        )
    evals, over_eval, source = [], 0, "none"
    if need_eval and d.dataset_test_split in splits and d.dataset_test_split != d.dataset_train_split:
        test_rows = splits[d.dataset_test_split][: d.eval_samples * 2]  # spare rows for skips
        evals, over_eval = to_examples(test_rows, shape, tokenizer, limit, d.max_length, d.overlong_prompts)
        evals, source = evals[: d.eval_samples], f"split:{d.dataset_test_split}"
    if need_eval and not evals:
        train, evals = hold_out(train, d.eval_samples, cfg.train.seed)
        source = "held-out"
    report = DataReport(
        shape, len(rows), len(train), len(evals), source, over_train + over_eval, d.overlong_prompts, limit
    )
    log.info(report.line())
    return Data(train, evals, report)


def read_splits(cfg: Config) -> dict[str, list[dict[str, Any]]]:
    """All splits of the dataset as lists of rows."""
    import datasets

    d = cfg.data
    name, p = d.dataset_name, Path(d.dataset_name).expanduser()
    datasets.disable_progress_bars()
    try:
        if p.is_file():
            kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(p.suffix)
            if kind is None:
                raise UserError(
                    f"dataset_name={name!r}: unsupported file type {p.suffix!r}; use .json, .jsonl or .parquet"
                )
            if _empty_file(p):  # datasets fails on these with an unhelpful message
                raise UserError(f"dataset {name!r} split {d.dataset_train_split!r} is empty")
            dd = datasets.load_dataset(kind, data_files={d.dataset_train_split: str(p)})
        else:
            dd = datasets.load_dataset(str(p) if p.is_dir() else name, name=d.dataset_config)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (network, format, missing config)
        raise UserError(f"cannot load dataset {name!r}: {' '.join(str(e).split())[:300]}") from None
    return {split: dd[split].to_list() for split in dd}


def _empty_file(p: Path) -> bool:
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(p).metadata.num_rows == 0
    return not p.read_text().strip()


def detect_shape(columns, name: str) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "prompt" in cols:
        return "prompt_completion" if "completion" in cols else "prompt_only"
    raise UserError(
        f"dataset {name!r} has columns {sorted(cols)}; expected 'messages' (chat turns), "
        "'prompt' + 'completion', or 'prompt' alone"
    )


def to_examples(rows, shape, tokenizer, limit, max_length, action) -> tuple[list[Example], int]:
    """Template and tokenize rows; return the examples and how many prompts were over `limit`."""
    pairs = [_texts(row, shape, tokenizer, i) for i, row in enumerate(rows)]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=not _has_template(tokenizer))["input_ids"]
    comp_texts = [c for _, c in pairs if c is not None]
    comps = iter(tokenizer(comp_texts, add_special_tokens=False)["input_ids"] if comp_texts else [])
    out, overlong = [], 0
    for (p_text, c_text), p_ids in zip(pairs, prompts):
        c_ids = end_at_eos(next(comps), tokenizer.eos_token_id) if c_text is not None else None
        if len(p_ids) > limit:
            overlong += 1
            if action == "skip":
                continue
            p_ids = p_ids[-limit:]  # keep the end: it holds the question and the generation prompt
        if c_ids is not None:
            c_ids = c_ids[: max_length - len(p_ids)]
        out.append(Example(p_ids, c_ids, p_text))
    return out, overlong


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _texts(row: dict[str, Any], shape: str, tokenizer, i: int) -> tuple[str, str | None]:
    """(templated prompt text, completion text or None) for one row."""
    if shape == "messages":
        msgs = _check_messages(row["messages"], i)
        if msgs[-1]["role"] == "assistant":
            return _chat_pair(tokenizer, msgs[:-1], msgs[-1:], i)
        return _chat_pair(tokenizer, msgs, None, i)
    prompt, completion = row["prompt"], row.get("completion") if shape == "prompt_completion" else None
    if isinstance(prompt, str) and not _has_template(tokenizer):
        if isinstance(completion, list):
            raise UserError(f"row {i}: conversational completions need a tokenizer with a chat template")
        return prompt, (None if completion is None else completion + tokenizer.eos_token)
    p_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt, i)
    if completion is None:
        return _chat_pair(tokenizer, p_msgs, None, i)
    c_msgs = (
        [{"role": "assistant", "content": completion}]
        if isinstance(completion, str)
        else _check_messages(completion, i)
    )
    return _chat_pair(tokenizer, p_msgs, c_msgs, i)


def _chat_pair(tokenizer, prompt_msgs, completion_msgs, i) -> tuple[str, str | None]:
    if not _has_template(tokenizer):
        raise UserError(
            f"row {i}: conversational data needs a tokenizer with a chat template; the student's has none"
        )
    if not prompt_msgs:
        raise UserError(f"row {i}: the conversation has no turns before the assistant's answer")
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    if completion_msgs is None:
        return prompt, None
    full = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    # A template that renders history differently once an answer follows: fall back to the raw text.
    return prompt, "".join(m["content"] for m in completion_msgs) + tokenizer.eos_token


def _check_messages(msgs: Any, i: int) -> list[dict[str, str]]:
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
    )
    if not ok:
        raise UserError(
            f"row {i}: expected a non-empty list of {{'role', 'content'}} messages, got {str(msgs)[:80]!r}"
        )
    return msgs


def end_at_eos(ids: list[int], eos: int) -> list[int]:
    """Cut after the first eos: templates often add a newline after it that the model never emits."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]


def hold_out(examples: list[Example], k: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off a seeded random slice for evaluation; it is never trained on."""
    k = min(k, max(1, len(examples) // 4)) if len(examples) > 1 else 0
    if k == 0:
        raise UserError(
            "the dataset has a single prompt: nothing can be held out for evaluation; set --eval_strategy no or add data"
        )
    order = list(range(len(examples)))
    random.Random(f"holdout:{seed}").shuffle(order)
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------- order and cursor


@dataclass
class Cursor:
    """Where the next prompt comes from: position `index` of epoch `epoch`'s seeded permutation."""

    epoch: int = 0
    index: int = 0


@dataclass
class PromptSampler:
    """Hands out prompt indices epoch by epoch, each epoch a seeded permutation.

    The order depends only on (seed, epoch), so a resumed run that restores the cursor sees exactly
    the prompts the interrupted run had not yet seen: none twice, none skipped within an epoch.
    """

    n: int
    seed: int
    cursor: Cursor = field(default_factory=Cursor)
    _cached: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            perm = list(range(self.n))
            random.Random(f"data:{self.seed}:{epoch}").shuffle(perm)
            self._cached = (epoch, perm)
        return self._cached[1]

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self.order(self.cursor.epoch)
            j = min(self.n, self.cursor.index + k - len(out))
            out += order[self.cursor.index : j]
            self.cursor = Cursor(self.cursor.epoch, j) if j < self.n else Cursor(self.cursor.epoch + 1, 0)
        return out
