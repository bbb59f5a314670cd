"""Load the student (with its LoRA) and the teacher, and check that their tokenizers agree.

The student is a transformers causal LM wrapped in a PEFT LoRA (all linear projections unless told
otherwise); the teacher is frozen in eval mode. Both honour dtype, attention implementation,
revision and trust_remote_code. Nothing here talks to the rollout server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from learner.errors import UserError
from shared.config import Config
from shared.messages import LoraSpec

log = logging.getLogger("gkd.learner")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Models:
    student: Any  # peft.PeftModel around the student base model (trainable LoRA only)
    teacher: Any  # transformers model, eval mode, requires_grad False; None with a teacher server
    tokenizer: Any  # the student's tokenizer (chat template, pad and eos ids)
    device: torch.device  # where the student lives
    teacher_device: torch.device  # where the teacher lives (may differ)
    vocab_size: int  # width of the student's logits; the teacher's logits are sliced to it
    lora: LoraSpec  # what the server needs to apply the adapter


def resolve_device(name: str | None, default: torch.device | None = None) -> torch.device:
    if name is None:
        return default or resolve_device("auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """--torch_dtype: "auto" is bfloat16 on CUDA (what a GPU user expects, and half the memory) and
    float32 elsewhere (on CPU fp32 matches a fp32 rollout server exactly: the canary and the
    policy-mismatch check can then use their tight fp32 bounds)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def enable_tf32(device: torch.device) -> bool:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (as HF's --tf32 does);
    returns whether TF32 is on for `device`. A no-op elsewhere."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def load_models(cfg: Config) -> Models:
    m = cfg.model
    device = resolve_device(m.device)
    teacher_device = resolve_device(m.teacher_device, default=device)
    for d in {device, teacher_device}:
        enable_tf32(d)
    tokenizer = load_tokenizer(m.model_name_or_path, cfg)
    student = _load_lm(
        m.model_name_or_path, cfg, "student", device, use_cache=not cfg.train.gradient_checkpointing
    )
    if m.teacher_url:  # a teacher server (learner.teacher) scores; its weights are never loaded here
        teacher, teacher_device, vocab = None, device, _rows(student)
    else:
        teacher_tok = load_tokenizer(m.teacher_model_name_or_path, cfg)
        teacher = _load_lm(m.teacher_model_name_or_path, cfg, "teacher", teacher_device, use_cache=True)
        vocab = check_tokenizers(tokenizer, teacher_tok, _rows(student), _rows(teacher))
        log.info("teacher: local %s on %s", m.teacher_model_name_or_path, teacher_device)

    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs; input grads keep PEFT's graph alive.
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.enable_input_require_grads()
    student = add_lora(student, cfg)
    if cfg.train.disable_dropout:
        disable_dropout(student)
    student.to(device)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        if cfg.train.disable_dropout:
            disable_dropout(teacher)
        teacher.to(teacher_device)
    return Models(student, teacher, tokenizer, device, teacher_device, vocab, lora_spec(student))


def load_tokenizer(path: str, cfg: Config):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=cfg.model.model_revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {path!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {path!r} has no eos token; completions could never end")
    return tok


def _load_lm(path: str, cfg: Config, role: str, device: torch.device, use_cache: bool):
    from transformers import AutoModelForCausalLM

    m = cfg.model
    kwargs: dict[str, Any] = {
        "revision": m.model_revision,
        "trust_remote_code": m.trust_remote_code,
        "dtype": resolve_torch_dtype(m.torch_dtype, device),
    }
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load the {role} model {path!r}: {_first_line(e)}") from None
    model.config.use_cache = use_cache
    return model


def _rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_tokenizers(student_tok, teacher_tok, student_rows: int, teacher_rows: int) -> int:
    """Return the logits width both sides use; raise UserError on any real mismatch.

    The teacher may have more embedding rows (padding rows, or extra tokens the student never
    emits) — its logits are then sliced to the student's width. Every token the student knows must
    have the same id for the teacher, and the end-of-sequence token must be the same.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    differ = [tok for tok, i in s_vocab.items() if t_vocab.get(tok) != i]
    if differ:
        sample = ", ".join(repr(t) for t in sorted(differ)[:3])
        raise UserError(
            f"student and teacher tokenizers disagree on {len(differ)} of {len(s_vocab)} tokens (e.g. {sample}); "
            "GKD compares next-token distributions, so both models must share one tokenizer"
        )
    extra = [i for tok, i in t_vocab.items() if tok not in s_vocab and i < student_rows]
    if extra:
        raise UserError(
            f"the teacher's tokenizer has {len(extra)} tokens with ids inside the student's vocabulary "
            f"(e.g. id {extra[0]}) that the student's tokenizer lacks; use models that share one tokenizer"
        )
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise UserError(
            f"student eos id {student_tok.eos_token_id} != teacher eos id {teacher_tok.eos_token_id}; "
            "the two tokenizers end sequences differently"
        )
    if teacher_rows < student_rows:
        raise UserError(
            f"the teacher's vocabulary ({teacher_rows} rows) is smaller than the student's ({student_rows}); "
            "only a larger teacher vocabulary can be sliced to match"
        )
    if teacher_rows > student_rows:
        log.info(
            "teacher vocabulary %d > student %d: teacher logits are sliced to the student's",
            teacher_rows,
            student_rows,
        )
    return student_rows


def add_lora(model, cfg: Config):
    from peft import LoraConfig, get_peft_model

    lo = cfg.lora
    peft_cfg = LoraConfig(
        r=lo.lora_r,
        lora_alpha=lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=lo.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # e.g. target modules not found in the model
        raise UserError(
            f"cannot apply LoRA (lora_target_modules={lo.lora_target_modules}): {_first_line(e)}"
        ) from None


def lora_spec(peft_model) -> LoraSpec:
    c = peft_model.peft_config["default"]
    # Short names ("q_proj"): PEFT may resolve "all-linear" to full paths; the tensors carry the paths.
    targets = sorted({name.rsplit(".", 1)[-1] for name in c.target_modules})
    return LoraSpec(
        r=c.r, lora_alpha=float(c.lora_alpha), target_modules=targets, use_rslora=bool(c.use_rslora)
    )


def disable_dropout(model) -> None:
    """Zero every dropout (as TRL's disable_dropout_in_model does, LoRA dropout included)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0


def adapter_tensors(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors with PEFT's saved names (what PushAdapter and adapter files carry)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_tensors(peft_model, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, tensors)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise UserError(f"checkpoint adapter does not fit this model: unexpected tensors {missing[:3]}")


@torch.no_grad()
def token_logprobs(model, ids: list[int], device: torch.device) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 under `model` (eval mode for the call)."""
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, x[0, 1:, None])[:, 0]
    finally:
        model.train(was_training)
    return lp.tolist()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
