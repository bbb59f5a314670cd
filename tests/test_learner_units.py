"""Learner parts on tiny real models, without a rollout server (fast)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from learner import checkpoint
from learner.checkpoint import TrainState
from learner.data import Cursor, PromptSampler, hold_out, load_data
from learner.errors import UserError
from learner.evaluate import distinct_n, token_divergences
from learner.loss import generalized_jsd_loss
from learner.metrics import MetricsLog, read
from learner.models import check_tokenizers, load_tokenizer
from learner.rollouts import is_on_policy
from learner.step import IGNORE, collate, completion_logits, distill_loss
from learner.sync import CanaryMismatch, compare
from shared.config import parse_args
from shared.tiny import build_model, build_tokenizer, write_dataset


def _cfg(tiny_models, dataset, *extra):
    cfg, _ = parse_args(
        [
            "--model_name_or_path",
            str(tiny_models.student),
            "--teacher_model_name_or_path",
            str(tiny_models.teacher),
            "--dataset_name",
            str(dataset),
            "--max_length",
            "96",
            "--max_new_tokens",
            "16",
            *extra,
        ]
    )
    return cfg


@pytest.fixture(scope="module")
def tok(tiny_models):
    return load_tokenizer(str(tiny_models.student), _cfg(tiny_models, "x/y"))


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("shape", ["messages", "prompt_completion", "prompt_only"])
def test_three_dataset_shapes(tiny_models, tok, tmp_path, shape):
    path = write_dataset(tmp_path / f"{shape}.jsonl", n=12, shape=shape)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    data = load_data(_cfg(tiny_models, path), tok, need_eval=False)
    assert data.report.shape == shape and len(data.train) == 12 and data.eval == []
    for row, ex in zip(rows, data.train):
        user = row["messages"][0]["content"] if shape == "messages" else row["prompt"]
        assert tok.decode(ex.prompt_ids) == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        if shape == "prompt_only":
            assert ex.completion_ids is None
        else:
            answer = row["messages"][1]["content"] if shape == "messages" else row["completion"]
            assert ex.completion_ids[-1] == tok.eos_token_id  # ends at eos: no template newline after it
            assert tok.decode(ex.completion_ids, skip_special_tokens=True) == answer


def test_conversational_prompt_completion_lists(tiny_models, tok, tmp_path):
    path = tmp_path / "conv.jsonl"
    row = {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sun"}],
        "completion": [{"role": "assistant", "content": "is light"}],
    }
    path.write_text(json.dumps(row) + "\n")
    ex = load_data(_cfg(tiny_models, path), tok, need_eval=False).train[0]
    assert tok.decode(ex.prompt_ids).startswith(
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe sun"
    )
    assert tok.decode(ex.completion_ids) == "is light<|im_end|>"


def test_plain_text_without_chat_template(tiny_models, tmp_path):
    plain_dir = tmp_path / "plain"
    build_tokenizer(plain_dir)
    (plain_dir / "chat_template.jinja").unlink()  # a plain (base-model) tokenizer
    cfg_file = plain_dir / "tokenizer_config.json"
    cfg_file.write_text(
        json.dumps({k: v for k, v in json.loads(cfg_file.read_text()).items() if k != "chat_template"})
    )
    tok = load_tokenizer(str(plain_dir), _cfg(tiny_models, "x/y"))
    path = write_dataset(tmp_path / "pc.jsonl", n=4, shape="prompt_completion")
    ex = load_data(_cfg(tiny_models, path), tok, need_eval=False).train[0]
    first = json.loads(path.read_text().splitlines()[0])
    assert tok.decode(ex.prompt_ids) == first["prompt"]
    conv = write_dataset(tmp_path / "m.jsonl", n=4, shape="messages")
    with pytest.raises(UserError, match="chat template"):
        load_data(_cfg(tiny_models, conv), tok, need_eval=False)


def test_overlong_prompts_are_counted_and_skipped_or_truncated(tiny_models, tok, tmp_path):
    path = write_dataset(tmp_path / "d.jsonl", n=40, shape="prompt_completion")
    full = load_data(_cfg(tiny_models, path, "--max_prompt_length", "90"), tok, need_eval=False).train
    limit = sorted(len(e.prompt_ids) for e in full)[20]  # the median: about half the prompts are over it
    n_over = sum(len(e.prompt_ids) > limit for e in full)
    assert 0 < n_over < 40  # the fixture data has both kinds
    skipped = load_data(_cfg(tiny_models, path, "--max_prompt_length", str(limit)), tok, need_eval=False)
    assert skipped.report.overlong == n_over and len(skipped.train) == 40 - n_over
    assert all(len(e.prompt_ids) <= limit for e in skipped.train)
    cut = load_data(
        _cfg(tiny_models, path, "--max_prompt_length", str(limit), "--overlong_prompts", "truncate"),
        tok,
        need_eval=False,
    )
    assert cut.report.overlong == n_over and len(cut.train) == 40
    for a, b in zip(full, cut.train):
        assert b.prompt_ids == a.prompt_ids[-limit:]  # the end (with the generation prompt) is kept
        assert len(b.prompt_ids) + len(b.completion_ids) <= 96
    assert f"{n_over} prompts over max_prompt_length={limit} skipped" in skipped.report.line()


def test_missing_columns_and_empty_dataset_are_user_errors(tiny_models, tok, tmp_path):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(UserError, match=r"columns \['answer', 'question'\]; expected 'messages'"):
        load_data(_cfg(tiny_models, wrong), tok, need_eval=False)
    empty = tmp_path / "empty.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    with pytest.raises(UserError, match="is empty"):
        load_data(_cfg(tiny_models, empty), tok, need_eval=False)
    d = tmp_path / "dir"
    d.mkdir()
    write_dataset(d / "train.jsonl", n=3)
    with pytest.raises(UserError, match=r"has no split 'validation' \(it has \['train'\]\)"):
        load_data(_cfg(tiny_models, d, "--dataset_train_split", "validation"), tok, need_eval=False)


def test_local_directory_with_test_split_is_the_eval_split(tiny_models, tok, tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    write_dataset(d / "train.jsonl", n=10, seed=1)
    write_dataset(d / "test.jsonl", n=3, seed=2)
    data = load_data(_cfg(tiny_models, d), tok, need_eval=True)
    assert (len(data.train), len(data.eval), data.report.eval_source) == (10, 3, "split:test")


def test_held_out_slice_is_never_trained_on(tiny_models, tok, tmp_path):
    path = write_dataset(tmp_path / "d.jsonl", n=20)
    data = load_data(_cfg(tiny_models, path, "--eval_samples", "4"), tok, need_eval=True)
    assert len(data.eval) == 4 and len(data.train) == 16 and data.report.eval_source == "held-out"
    train_prompts = {tuple(e.prompt_ids) for e in data.train}
    assert not any(tuple(e.prompt_ids) in train_prompts for e in data.eval)
    with pytest.raises(UserError):
        hold_out(data.train[:1], 4, 0)


def test_sampler_epochs_are_permutations_and_resume_continues_exactly():
    a = PromptSampler(10, seed=7)
    seen = [a.take(3) for _ in range(7)]  # 21 prompts: 2 full epochs + 1
    flat = sum(seen, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # each epoch is reshuffled
    assert a.cursor == Cursor(epoch=2, index=1)
    b = PromptSampler(10, seed=7)
    b.take(3), b.take(3)
    resumed = PromptSampler(10, seed=7, cursor=b.cursor)
    assert sum([resumed.take(3) for _ in range(5)], []) == flat[6:21]
    assert PromptSampler(10, seed=8).take(10) != flat[:10]


# ---------------------------------------------------------------- models, tokenizers, batches


def test_tokenizer_mismatch_is_a_clear_error(tok, tmp_path):
    other = build_tokenizer(tmp_path / "other", vocab_size=300, seed=5)
    with pytest.raises(UserError, match="tokenizers disagree on"):
        check_tokenizers(tok, other, len(tok), len(other))
    with pytest.raises(UserError, match="smaller than the student's"):
        check_tokenizers(tok, tok, 400, 390)
    assert check_tokenizers(tok, tok, len(tok), len(tok) + 64) == len(tok)


def test_larger_teacher_vocab_is_sliced(tiny_models, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    big = build_model(
        tmp_path / "big", num_layers=1, seed=3, tokenizer_dir=tiny_models.student, vocab_size=len(tok) + 32
    )
    teacher = AutoModelForCausalLM.from_pretrained(str(big)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(tiny_models.student))
    assert check_tokenizers(tok, load_tokenizer(str(big), _cfg(tiny_models, "x/y")), 384, 416) == 384
    batch = collate(
        [[5, 6, 7], [8, 9]], [[10, 11, tok.eos_token_id], [12, tok.eos_token_id]], tok.pad_token_id, 64
    )
    t_logits = completion_logits(teacher, batch, vocab=384)
    assert t_logits.shape[-1] == 384
    full = completion_logits(teacher, batch, vocab=10**6)
    assert full.shape[-1] == 416 and torch.equal(full[..., :384], t_logits)
    loss = distill_loss(student, teacher, batch, vocab=384, beta=0.5, temperature=1.0)
    s_logits = completion_logits(student, batch, vocab=384)
    expected = generalized_jsd_loss(s_logits, full[..., :384], labels=batch.labels, beta=0.5)
    assert torch.isfinite(loss) and torch.allclose(loss, expected, atol=1e-6)


def test_collate_aligns_completions_and_matches_unpadded_logits(tiny_models, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models.student)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    comps = [[20, 21], [22, 23, 24, 25], []]
    batch = collate(prompts, comps, tok.pad_token_id, max_length=64)
    assert batch.labels.tolist() == [[20, 21, IGNORE, IGNORE], [22, 23, 24, 25], [IGNORE] * 4]
    assert batch.n_tokens == 6 and batch.input_ids.shape == (3, 9)
    with torch.no_grad():
        logits = completion_logits(model, batch, vocab=384)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            if not c:
                continue
            alone = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
            torch.testing.assert_close(logits[i, : len(c)], alone, atol=1e-5, rtol=1e-4)
    assert collate([[1, 2]], [[]], 0, 64) is None
    assert collate([[1, 2, 3]], [[4, 5, 6, 7]], 0, max_length=5).labels.tolist() == [
        [4, 5]
    ]  # cut at max_length


# ---------------------------------------------------------------- rollouts, sync, evaluation helpers


def test_on_policy_draw_is_seeded_with_probability_lmbda():
    draws = [is_on_policy(3, i, 0.3) for i in range(4000)]
    assert abs(sum(draws) / 4000 - 0.3) < 0.03
    assert draws == [is_on_policy(3, i, 0.3) for i in range(4000)]
    assert not any(is_on_policy(3, i, 0.0) for i in range(500)) and all(
        is_on_policy(3, i, 1.0) for i in range(500)
    )


def test_canary_tolerance_depends_on_dtype():
    base = [-1.0, -2.0, -3.0, -0.5]
    assert compare(base, [x + 5e-4 for x in base], torch.float32, "float32")[1] == pytest.approx(5e-4)
    with pytest.raises(CanaryMismatch, match="max <= 0.001"):
        compare(base, [x + 2e-3 for x in base], torch.float32, "float32")
    # bf16 on either side: mean |Δ| < 0.05 and max |Δ| < 0.5
    assert compare(base, [base[0] + 0.1, base[1] - 0.02, *base[2:]], torch.float32, "bfloat16")[
        1
    ] == pytest.approx(0.1)
    with pytest.raises(CanaryMismatch):
        compare(base, [x + 0.06 for x in base], torch.bfloat16, "bfloat16")
    with pytest.raises(CanaryMismatch):
        compare(base, [base[0] + 0.6, *base[1:]], torch.bfloat16, "float32")
    with pytest.raises(CanaryMismatch, match="returned 3"):
        compare(base, base[:3], torch.float32, "float32")


def test_distinct_2():
    assert distinct_n([[1, 2, 3, 4]]) == 1.0
    assert distinct_n([[7, 7, 7, 7, 7]]) == 0.25  # 4 bigrams, one distinct
    assert distinct_n([[1, 2], [1, 2]]) == 0.5
    assert distinct_n([[1], []]) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_eval_divergences_agree_with_the_training_loss(beta):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 50, generator=g), torch.randn(2, 5, 50, generator=g)
    labels = torch.randint(0, 50, (2, 5), generator=g)
    labels[1, 3:] = IGNORE
    d = token_divergences(s, t, labels, beta)
    ref = generalized_jsd_loss(s, t, labels=labels, beta=beta)
    assert d["jsd"].shape == (8,) and d["jsd"].mean().item() == pytest.approx(ref.item(), abs=1e-5)
    assert d["kl_fwd"].mean().item() == pytest.approx(
        generalized_jsd_loss(s, t, labels=labels, beta=0.0).item(), abs=1e-5
    )
    assert d["kl_rev"].mean().item() == pytest.approx(
        generalized_jsd_loss(s, t, labels=labels, beta=1.0).item(), abs=1e-5
    )


# ---------------------------------------------------------------- checkpoints and metrics


def _save(out, step, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter = {
        "base_model.model.l.lora_A.weight": torch.randn(2, 4, generator=g),
        "base_model.model.l.lora_B.weight": torch.randn(4, 2, generator=g),
    }
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    state = TrainState(step=step, policy_version=step + 1, cursor=Cursor(1, step), micro_batches=4 * step)
    return checkpoint.save(out, state, adapter, opt.state_dict(), {"last_epoch": step}), adapter, opt


def test_checkpoint_round_trip_restores_everything(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    path, adapter, opt = _save(tmp_path, 3)
    expect = (random.random(), torch.rand(2).tolist())
    ck = checkpoint.load(checkpoint.find_latest(tmp_path))
    checkpoint.restore_rng(ck)
    assert (random.random(), torch.rand(2).tolist()) == expect
    assert ck["state"] == TrainState(step=3, policy_version=4, cursor=Cursor(1, 3), micro_batches=12)
    assert all(torch.equal(ck["adapter"][k], v) for k, v in adapter.items())
    assert torch.equal(ck["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_resume_latest_ignores_incomplete_checkpoints(tmp_path):
    good, _, _ = _save(tmp_path, 2)
    newer, _, _ = _save(tmp_path, 4)
    root = checkpoint.checkpoints_dir(tmp_path)
    (newer / "manifest.json").unlink()  # as if the writer died before the manifest
    corrupt, _, _ = _save(tmp_path, 6)
    (corrupt / "optimizer.pt").write_bytes(b"torn write")
    half = root / ".tmp-step-8-999"  # a temporary dir left by a crash
    half.mkdir()
    (half / "state.json").write_text("{}")
    assert checkpoint.find_latest(tmp_path) == good
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoint.require_complete(newer)
    assert checkpoint.find_latest(tmp_path / "nothing-here") is None


def test_failed_checkpoint_write_is_a_user_error_and_keeps_the_previous_one(tmp_path, monkeypatch):
    good, _, _ = _save(tmp_path, 2)
    import os

    monkeypatch.setattr(os, "getpid", lambda: 4242)
    (checkpoint.checkpoints_dir(tmp_path) / ".tmp-step-4-4242").write_text("a file where the tmp dir must go")
    with pytest.raises(UserError, match="cannot write checkpoint .*step-4.*earlier checkpoints are intact"):
        _save(tmp_path, 4)
    assert checkpoint.find_latest(tmp_path) == good and checkpoint.verify(good)
    assert not (checkpoint.checkpoints_dir(tmp_path) / "step-4").exists()


def test_metrics_log_trims_steps_after_the_resumed_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, resume_step=None)
    for s in range(1, 6):
        log.log(s, {"loss": 1.0 / s, "nan": float("nan")})
    log.close()
    assert read(tmp_path)[0]["nan"] is None
    MetricsLog(tmp_path, resume_step=3).close()
    assert [r["step"] for r in read(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "runs").is_dir()


def test_memo_teacher_scores_fixed_text_once_with_the_same_figures(tiny_models, tiny_dataset):
    """MemoTeacher: the evaluation's teacher-written text is scored by the teacher once; the later
    evaluations (and curve points) get the very targets it computed, so the figures do not move."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.data import to_examples
    from learner.evaluate import divergences
    from learner.teacher import LocalTeacher, MemoTeacher

    tok = AutoTokenizer.from_pretrained(str(tiny_models.student))
    student = AutoModelForCausalLM.from_pretrained(str(tiny_models.student), dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_models.teacher), dtype=torch.float32).eval()
    vocab = student.get_output_embeddings().weight.shape[0]
    rows = [json.loads(x) for x in tiny_dataset.read_text().splitlines()][:10]
    examples, _ = to_examples(rows, "prompt_completion", tok, 96, 128, "skip")
    prompts, text = [e.prompt_ids for e in examples], [e.completion_ids for e in examples]
    kw = dict(beta=0.5, vocab=vocab, pad_id=tok.pad_token_id, max_length=128, batch_size=4, device="cpu")

    plain = divergences(student, teacher, prompts, text, **kw)
    memo = MemoTeacher(LocalTeacher(teacher, torch.device("cpu"), vocab=vocab))
    first = divergences(student, memo, prompts, text, **kw)
    held = memo.held_bytes
    assert held > 0 and first == pytest.approx(plain, rel=1e-6)
    memo.teacher.model = None  # any batch it had to score again would fail now
    assert divergences(student, memo, prompts, text, **kw) == first and memo.held_bytes == held
    # a subset batched the same way (a curve point's first prompts) comes from the memo too
    assert divergences(student, memo, prompts[:4], text[:4], **kw) == pytest.approx(
        divergences(student, teacher, prompts[:4], text[:4], **kw), rel=1e-6
    )
    # past max_bytes nothing is kept: every call scores afresh
    none = MemoTeacher(LocalTeacher(teacher, torch.device("cpu"), vocab=vocab), max_bytes=held - 1)
    assert divergences(student, none, prompts, text, **kw) == pytest.approx(plain, rel=1e-6)
    assert 0 < none.held_bytes < held
