"""Tiny real models for tests and benchmarks: random weights, a real (trained) BPE tokenizer.

Nothing is downloaded. The architecture is the one the embedded default uses (Llama with tied
embeddings, like SmolLM2), just small: the code paths are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "be",
    "this",
    "from",
    "or",
    "have",
    "not",
    "are",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "more",
    "if",
    "no",
    "out",
    "so",
    "said",
    "up",
    "about",
    "than",
    "into",
    "them",
    "could",
    "only",
    "other",
    "new",
    "some",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "my",
    "now",
    "such",
    "like",
    "our",
    "over",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "explain",
    "write",
    "list",
    "describe",
    "why",
    "water",
    "light",
    "sun",
    "tree",
    "river",
    "city",
    "music",
    "code",
    "python",
    "number",
    "story",
    "poem",
    "summer",
    "winter",
    "friend",
    "teacher",
    "student",
    "model",
    "learn",
    "data",
    "train",
    "answer",
    "question",
    "simple",
    "short",
]


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) + rng.choice(".?!")
        for _ in range(n_lines)
    ]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 384, seed: int = 0):
    """Train a byte-level BPE on a small synthetic corpus and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden: int = 128,
    intermediate: int = 256,
    heads: int = 2,
    kv_heads: int = 2,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int = 1024,
):
    """Save a random tiny Llama (tied embeddings, like SmolLM2) plus tokenizer to out_dir."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else build_tokenizer(out)
    if tokenizer_dir:
        tok.save_pretrained(str(out))
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Larger-than-default init so random models have peaked, distinguishable distributions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_pair(root: str | Path, *, student_layers: int = 2, teacher_layers: int = 3) -> tuple[Path, Path]:
    """A student and a teacher sharing one tokenizer: root/student, root/teacher."""
    root = Path(root)
    tok_dir = root / "tokenizer"
    build_tokenizer(tok_dir)
    student = build_model(root / "student", num_layers=student_layers, seed=1, tokenizer_dir=tok_dir)
    teacher = build_model(root / "teacher", num_layers=teacher_layers, seed=2, tokenizer_dir=tok_dir)
    return student, teacher


def write_dataset(path: str | Path, n: int = 32, seed: int = 0, shape: str = "prompt_completion") -> Path:
    """A small jsonl dataset in one of the three shapes the learner reads."""
    lines = corpus(n_lines=2 * n, seed=seed)
    rows = []
    for i in range(n):
        p, c = lines[2 * i], lines[2 * i + 1]
        if shape == "messages":
            rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]})
        elif shape == "prompt_only":
            rows.append({"prompt": p})
        else:
            rows.append({"prompt": p, "completion": c})
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
