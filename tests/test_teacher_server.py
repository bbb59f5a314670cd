"""The teacher role of the server: score requests from vLLM prompt logprobs, and refused pushes."""

from __future__ import annotations

import msgspec
import pytest
import torch

from rollout_server.teacher import check_score, sequence_scores
from shared.messages import (
    Envelope,
    ScoreReply,
    ScoreRequest,
    ScoreSequence,
    SequenceScores,
    decode_reply,
    decode_request,
    encode,
)
from shared.transport.base import RemoteError


def _position(entries: dict[int, float], ranks: dict[int, int]):
    from vllm.logprobs import Logprob

    return {t: Logprob(logprob=lp, rank=ranks[t]) for t, lp in entries.items()}


def test_sequence_scores_keeps_the_top_k_and_the_actual_token():
    # Position 2 predicts completion[0] = 7, which is in the top-2: 2 entries.
    # Position 3 predicts completion[1] = 9, outside the top-2: vLLM adds it as a third entry
    # (and, as vLLM builds the dict, first).
    plp = [
        None,
        _position({1: -0.1, 2: -2.5}, {1: 1, 2: 2}),
        _position({7: -0.5, 3: -1.0}, {7: 1, 3: 2}),
        _position({9: -6.0, 4: -0.2, 5: -1.9}, {9: 40, 4: 1, 5: 2}),
    ]
    got = sequence_scores(2, [7, 9], plp, k=2)
    assert got.topk_ids == [[7, 3], [4, 5]]
    assert got.topk_logprobs == [[-0.5, -1.0], [-0.2, -1.9]]
    assert got.token_logprobs == [-0.5, -6.0]


def test_sequence_scores_refuses_a_short_position():
    plp = [None, _position({1: -0.1}, {1: 1})]
    with pytest.raises(ValueError, match="fewer than k"):
        sequence_scores(1, [1], plp, k=2)


def test_check_score():
    ok = ScoreRequest(request_id="a", sequences=[ScoreSequence(prompt_ids=[1, 2], completion_ids=[3])], k=4)
    kw = dict(vocab=10, max_logprobs=8, max_model_len=16)
    assert check_score(ok, **kw) == ""
    assert "k=9" in check_score(msgspec.structs.replace(ok, k=9), **kw)
    assert "k=0" in check_score(msgspec.structs.replace(ok, k=0), **kw)
    long = ScoreRequest(
        request_id="b", sequences=[ScoreSequence(prompt_ids=[1] * 10, completion_ids=[2] * 6)]
    )
    assert "max_model_len" in check_score(msgspec.structs.replace(long, k=1), **kw)
    bad = ScoreRequest(request_id="c", sequences=[ScoreSequence(prompt_ids=[1], completion_ids=[10])], k=1)
    assert "vocabulary" in check_score(bad, **kw)
    empty = ScoreRequest(request_id="d", sequences=[ScoreSequence(prompt_ids=[1], completion_ids=[])], k=1)
    assert "non-empty" in check_score(empty, **kw)


def test_score_messages_round_trip():
    req = ScoreRequest(
        request_id="r", sequences=[ScoreSequence(prompt_ids=[1, 2], completion_ids=[3, 4])], k=2
    )
    assert decode_request(encode(Envelope(token="t", body=req))).body == req
    rep = ScoreReply(
        request_id="r",
        scores=[SequenceScores(topk_ids=[[3, 5]], topk_logprobs=[[-0.1, -3.0]], token_logprobs=[-0.1])],
        model="m",
        tokenizer_fingerprint="f",
    )
    assert decode_reply(encode(rep)) == rep


def test_tokenizer_fingerprint_tells_vocabularies_apart(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from shared.tiny import build_tokenizer
    from shared.vocab import tokenizer_fingerprint

    s = AutoTokenizer.from_pretrained(str(tiny_models.student))
    t = AutoTokenizer.from_pretrained(str(tiny_models.teacher))
    assert tokenizer_fingerprint(s) == tokenizer_fingerprint(t)
    other = build_tokenizer(tmp_path / "other", vocab_size=400)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(s)


# ---------------------------------------------------------------- a real teacher server


@pytest.fixture(scope="module")
def teacher_server(tiny_models, server_pool, tmp_path_factory):
    from tests.conftest import start_server

    server_pool.shrink(1)  # two engines at most: one pool server and the teacher
    srv = start_server(
        tiny_models.teacher,
        tmp_path_factory.mktemp("teacher") / "teacher.log",
        role="teacher",
        max_model_len=512,
        kv_cache_gb=1,
        max_logprobs=64,
    )
    yield srv
    srv.stop()


def _hf_logprobs(model_dir, prompt, completion):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.slow
def test_teacher_scores_match_the_hf_teacher(teacher_server, tiny_models):
    prompt, completion = [5, 17, 42, 99, 7], [13, 250, 8, 301, 64, 2]
    k = 10
    with teacher_server.client() as c:
        status = c.status()
        assert status.role == "teacher" and status.tokenizer_fingerprint
        req = ScoreRequest(
            request_id="s1", sequences=[ScoreSequence(prompt_ids=prompt, completion_ids=completion)], k=k
        )
        reply = c.score(req)
    assert reply.request_id == "s1" and reply.tokenizer_fingerprint == status.tokenizer_fingerprint
    (sc,) = reply.scores
    ref = _hf_logprobs(tiny_models.teacher, prompt, completion)
    ref_top, ref_ids = ref.topk(k, dim=-1)
    got_lp = torch.tensor(sc.topk_logprobs)
    torch.testing.assert_close(got_lp, ref_top, atol=1e-4, rtol=0)
    # Ids agree wherever the reference has no near-tie at that rank.
    gap = (ref_top[:, :-1] - ref_top[:, 1:]).abs() > 1e-3
    same = torch.tensor(sc.topk_ids)[:, :-1] == ref_ids[:, :-1]
    assert same[gap].all()
    want_tok = ref.gather(-1, torch.tensor(completion)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(sc.token_logprobs), want_tok, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_teacher_refuses_pushes_and_oversized_k(teacher_server, make_adapter):
    with teacher_server.client() as c:
        with pytest.raises(RemoteError) as e:
            c.push_adapter(make_adapter().push(1))
        assert e.value.code == "teacher_role"
        req = ScoreRequest(
            request_id="s2", sequences=[ScoreSequence(prompt_ids=[1], completion_ids=[2])], k=65
        )
        with pytest.raises(RemoteError) as e:
            c.score(req)
        assert e.value.code == "bad_request" and "max_logprobs" in e.value.message
        assert c.status().policy_version == 0
