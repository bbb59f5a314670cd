"""The learner end to end against a real rollout server over ZeroMQ (tiny models, few steps).

All tests here share one pool server (max_lora_rank 64, so the seed's r=64 fits) and reuse it at
whatever policy version the previous test left: the learner's first push is always the server's
version + 1, so each test reads the version before and after its own run. The merged-output test
stops it to serve the merged model; the next test that asks the pool gets a fresh one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import learner_flags

from learner import checkpoint
from learner.metrics import read
from learner.recipe import run
from learner.rollouts import is_on_policy
from shared.config import parse_args
from shared.messages import GenerateRequest, Prompt, SamplingSpec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SERVER_FLAGS = {"max_lora_rank": 64}


@pytest.fixture
def server(server_pool):
    return server_pool.get(fresh=False, **SERVER_FLAGS)


def _cfg(tiny_models, data, out, url, *extra):
    argv = learner_flags(
        tiny_models, data, out, url, "--reconnect_deadline_s", "30", "--torch_num_threads", "1"
    )
    return parse_args(argv + list(extra))[0]


def _train_rows(out):
    return [r for r in read(out) if "loss" in r]


def _server_version(server) -> int:
    c = server.client()
    try:
        return c.status().policy_version
    finally:
        c.close()


def _server_greedy(server, prompt_ids):
    """The server's greedy continuation of `prompt_ids` (8 tokens) with its log-probs."""
    c = server.client()
    try:
        req = GenerateRequest(
            request_id="check",
            prompts=[Prompt(prompt_id="0", token_ids=prompt_ids)],
            sampling=SamplingSpec(temperature=0.0, max_new_tokens=8, seed=0),
        )
        return c.generate(req).completions[0]
    finally:
        c.close()


def _assert_server_serves(server, adapter_dir, student_dir, prompt_ids, comp=None):
    """Greedy continuation on the server (or `comp`, one taken earlier), scored by HF+PEFT with the
    saved adapter: equal within fp32 tolerance."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    comp = comp or _server_greedy(server, prompt_ids)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32), str(adapter_dir)
    ).eval()
    ids = prompt_ids + list(comp.token_ids)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    ours = [lp[i - 1, ids[i]].item() for i in range(len(prompt_ids), len(ids))]
    assert max(abs(a - b) for a, b in zip(ours, comp.logprobs)) < 1e-3


FULL_RUN_PROMPT = [5, 17, 42, 99, 3, 250]


@pytest.fixture(scope="module")
def full_run(tiny_models, tiny_dataset, tmp_path_factory, server_pool):
    """One 4-step run (lmbda 0.5, eval every 2 steps, merged output), shared by the tests that inspect it."""
    server = server_pool.get(fresh=False, **SERVER_FLAGS)
    out = tmp_path_factory.mktemp("full") / "run"
    v0 = _server_version(server)
    cfg = _cfg(
        tiny_models,
        tiny_dataset,
        out,
        server.url,
        "--max_steps",
        "4",
        "--lmbda",
        "0.5",
        "--eval_on_start",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--eval_samples",
        "4",
        "--save_steps",
        "2",
        "--save_merged",
    )
    result = run(cfg)
    # read now: the pool server is shared, and a later test may push to it or restart it
    return out, cfg, result, v0, _server_version(server), _server_greedy(server, FULL_RUN_PROMPT)


def test_full_run_lmbda_half(tiny_models, full_run):
    out, cfg, result, v0, v_end, served = full_run
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    # one push before the first rollout, then one per step (sync_steps 1), each canary-checked
    assert [r["policy_version"] for r in rows] == [v0 + 2, v0 + 3, v0 + 4, v0 + 5]
    assert v_end == v0 + 5 == result["policy_version"]
    assert all(r["canary_max_abs"] <= 1e-3 for r in rows)
    # the on/off-policy split is exactly the seeded draws; on-policy rollouts were fresh enough
    draws = [is_on_policy(cfg.train.seed, i, 0.5) for i in range(8)]
    assert [r["on_policy_micro_batches"] for r in rows] == [sum(draws[2 * s : 2 * s + 2]) for s in range(4)]
    assert 0 < sum(draws) < 8
    assert all(r["staleness"] is None or 0 <= r["staleness_max"] <= cfg.rollout.max_staleness for r in rows)
    assert all(r["dropped_stale"] == 0 for r in rows)  # requests ahead carry min_version, so none go stale
    for key in ("lr", "seconds_per_step", "tokens_per_s", "on_policy_fraction"):
        assert all(isinstance(r[key], float) for r in rows), key

    evals = [r for r in read(out) if "eval/student/jsd" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        for k in (
            "eval/student/jsd",
            "eval/student/kl_fwd",
            "eval/student/kl_rev",
            "eval/student/teacher_nll",
            "eval/teacher_text/jsd",
            "eval/teacher_text/kl_fwd",
            "eval/teacher_text/kl_rev",
        ):
            assert math.isfinite(r[k]) and r[k] >= 0, k
        assert 0 < r["eval/student/distinct2"] <= 1
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 2, 4} and all(
        {"prompt", "student", "teacher"} <= set(s) for s in samples
    )

    start = next(r for r in read(out) if r.get("event") == "start")
    assert (start["step"], start["total_steps"], start["train_prompts"], start["eval_prompts"]) == (
        0,
        4,
        28,
        4,
    )
    assert (start["overlong_prompts"], start["data_shape"]) == (0, "prompt_completion")
    assert json.loads((out / "config.json").read_text())["gkd"]["lmbda"] == 0.5
    assert checkpoint.find_latest(out).name == "step-4"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "arXiv:2306.13649" in card and "ICLR 2024" in card and '"lmbda": 0.5' in card
    assert list((out / "runs").iterdir())  # TensorBoard event file

    # outputs: PEFT adapter, merged transformers model, and the server really serves this adapter
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([FULL_RUN_PROMPT])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_models.student)), str(out)
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models.student)).eval()
    with torch.no_grad():
        a, b, c = peft_model(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3  # training changed the model
    _assert_server_serves(None, out, tiny_models.student, FULL_RUN_PROMPT, comp=served)


@pytest.mark.parametrize(
    "lmbda,seq_kd,on_frac,teacher_frac",
    [("0", "false", 0.0, 0.0), ("1", "false", 1.0, 0.0), ("0", "true", 0.0, 1.0)],
    ids=["lmbda0", "lmbda1", "seq_kd"],
)
def test_lmbda_extremes_and_seq_kd(
    tiny_models, tiny_dataset, tmp_path, server, lmbda, seq_kd, on_frac, teacher_frac
):
    out = tmp_path / "run"
    run(
        _cfg(
            tiny_models,
            tiny_dataset,
            out,
            server.url,
            "--max_steps",
            "2",
            "--lmbda",
            lmbda,
            "--seq_kd",
            seq_kd,
            "--save_steps",
            "100",
        )
    )
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["on_policy_fraction"] for r in rows] == [on_frac] * 2
    assert [r["teacher_generated_fraction"] for r in rows] == [teacher_frac] * 2
    assert all((r["staleness"] is None) == (on_frac == 0) for r in rows)


def test_prompt_only_dataset_uses_teacher_samples(tiny_models, tmp_path, server):
    """No dataset completions: off-policy micro-batches and the eval's teacher text are teacher samples."""
    from shared.tiny import write_dataset

    data = write_dataset(tmp_path / "prompts.jsonl", n=12, shape="prompt_only")
    out = tmp_path / "run"
    run(
        _cfg(
            tiny_models,
            data,
            out,
            server.url,
            "--max_steps",
            "2",
            "--lmbda",
            "0.5",
            "--eval_on_start",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--eval_samples",
            "2",
            "--save_steps",
            "100",
        )
    )
    rows = _train_rows(out)
    assert all(r["on_policy_fraction"] + r["teacher_generated_fraction"] == 1.0 for r in rows)
    evals = [r for r in read(out) if "eval/teacher_text/jsd" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert (
        len({r["eval/teacher_text/distinct2"] for r in evals}) == 1
    )  # the same cached teacher samples each time


def test_heldout_divergence_on_teacher_text_falls(tiny_models, tmp_path, server):
    from shared.tiny import write_dataset

    data = write_dataset(tmp_path / "small.jsonl", n=16, seed=3)
    out = tmp_path / "run"
    run(
        _cfg(
            tiny_models,
            data,
            out,
            server.url,
            "--max_steps",
            "12",
            "--learning_rate",
            "5e-3",
            "--lmbda",
            "0.5",
            "--eval_on_start",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "100",
            "--eval_samples",
            "4",
            "--save_steps",
            "100",
            "--lora_r",
            "16",
            "--lora_target_modules",  # the 20% target was set with every linear projection adapted
            "all-linear",  # (PEFT's default, q_proj and v_proj only, measured 12.5% in 12 steps)
        )
    )
    evals = [r for r in read(out) if "eval/teacher_text/jsd" in r]
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, 12)
    assert after["eval/teacher_text/jsd"] < 0.8 * before["eval/teacher_text/jsd"], (before, after)


def test_resume_continues_without_gap_or_repeat(tiny_models, tiny_dataset, tmp_path, server, make_adapter):
    out = tmp_path / "run"
    common = ("--save_steps", "1", "--lr_scheduler_type", "constant", "--lmbda", "0.5")
    run(
        _cfg(tiny_models, tiny_dataset, out, server.url, "--max_steps", "3", *common)
    )  # "stopped" after step 3
    v3 = _server_version(server)
    result = run(
        _cfg(tiny_models, tiny_dataset, out, server.url, "--max_steps", "6", "--resume", "latest", *common)
    )
    assert result["step"] == 6

    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    versions = [r["policy_version"] for r in rows]
    assert (
        versions == list(range(versions[0], versions[0] + 6)) and versions[2] == v3
    )  # the server already had step 3's adapter
    # the data cursor continues: it is where an uninterrupted sampler is after 4 prompts per step
    from learner.data import PromptSampler

    ref = PromptSampler(32, seed=42)
    for r in rows:
        ref.take(4)
        assert (r["data_epoch"], r["data_index"]) == (ref.cursor.epoch, ref.cursor.index)
    state = checkpoint.load(checkpoint.find_latest(out))["state"]
    assert (state.step, state.micro_batches, state.policy_version) == (6, 12, versions[-1])
    assert (state.cursor.epoch, state.cursor.index) == (0, 24)

    # The server moves on (another adapter is pushed); resuming must bring it back to the checkpoint's.
    c = server.client()
    try:
        c.push_adapter(make_adapter(r=8, seed=5).push(versions[-1] + 1))
    finally:
        c.close()
    result = run(
        _cfg(tiny_models, tiny_dataset, out, server.url, "--max_steps", "6", "--resume", "latest", *common)
    )
    assert result["step"] == 6 and _server_version(server) == versions[-1] + 2
    _assert_server_serves(server, out, tiny_models.student, [7, 8, 9, 10, 11])


def test_seed_command_line_runs_unchanged(tiny_models, tiny_dataset, tmp_path, server):
    """TRL's examples/scripts/gkd.py command, with local model/dataset paths, no --push_to_hub, 2 steps."""
    seed = (
        f"--model_name_or_path {tiny_models.student} --teacher_model_name_or_path {tiny_models.teacher} "
        f"--dataset_name {tiny_dataset} --learning_rate 2e-4 --per_device_train_batch_size 4 "
        "--gradient_accumulation_steps 8 --output_dir gkd-model --num_train_epochs 1 "
        "--gradient_checkpointing --use_peft --lora_r 64 --lora_alpha 16"
    ).split()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GKD_ROLLOUT_URL": server.url, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "learner", *seed, "--max_steps", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "gkd-model"
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [2]  # logging_steps 10: the last step is always logged
    assert math.isfinite(rows[0]["loss"])
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["lora"]["lora_r"],
        cfg["train"]["gradient_accumulation_steps"],
        cfg["train"]["gradient_checkpointing"],
    ) == (64, 8, True)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 64


def test_canary_mismatch_is_a_hard_error(tiny_models, tiny_dataset, tmp_path, server):
    """A student that is not the server's base model: the first push's canary disagrees and training never starts."""
    from learner.sync import CanaryMismatch
    from shared.tiny import build_model

    other = build_model(tmp_path / "other-student", num_layers=2, seed=9, tokenizer_dir=tiny_models.student)
    with pytest.raises(CanaryMismatch, match="canary logprobs differ"):
        run(
            _cfg(
                tiny_models,
                tiny_dataset,
                tmp_path / "run",
                server.url,
                "--max_steps",
                "1",
                "--model_name_or_path",
                str(other),
            )
        )
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not _train_rows(tmp_path / "run")


def test_two_learner_processes_over_gloo(tiny_models, tiny_dataset, tmp_path, server):
    """torchrun, 2 CPU ranks: both step, gradients are averaged (same weights), one push per sync."""
    import re

    v0 = _server_version(server)
    out = tmp_path / "ddp"
    args = [
        "--model_name_or_path",
        str(tiny_models.student),
        "--teacher_model_name_or_path",
        str(tiny_models.teacher),
        "--dataset_name",
        str(tiny_dataset),
        "--output_dir",
        str(out),
        "--rollout_url",
        server.url,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_new_tokens",
        "16",
        "--max_length",
        "128",
        "--logging_steps",
        "1",
        "--use_peft",
        "--lora_r",
        "8",
        "--learning_rate",
        "1e-3",
        "--lmbda",
        "0.5",
        "--torch_num_threads",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "learner",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    done = re.findall(
        r"rank (\d)/2 finished at step (\d+), policy version (\d+), adapter digest (\w+)",
        res.stderr + res.stdout,
    )
    assert sorted(d[0] for d in done) == ["0", "1"], res.stderr[-3000:]
    assert (
        len({d[1:] for d in done}) == 1 and done[0][1] == "2"
    )  # same step, version and weights on both ranks
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (
        _server_version(server) == v0 + 3 == int(done[0][2])
    )  # initial push + one per step, from rank 0 only


def test_merged_output_serves_as_the_rollout_server_base_model(full_run, tmp_path, server_pool):
    """It serves the merged model on an engine of its own, beside at most one pool server."""
    from conftest import hf_logprobs, start_server
    from transformers import AutoModelForCausalLM

    out = full_run[0]
    server_pool.shrink(1)
    srv = start_server(out / "merged", tmp_path / "merged-server.log", max_model_len=512, kv_cache_gb=1)
    try:
        c = srv.client()
        prompt = [5, 17, 42, 99]
        req = GenerateRequest(
            request_id="m",
            prompts=[Prompt(prompt_id="0", token_ids=prompt)],
            sampling=SamplingSpec(temperature=0.0, max_new_tokens=8),
        )
        comp = c.generate(req).completions[0]
        status = c.status()
        c.close()
    finally:
        srv.stop()
    assert status.model == str(out / "merged") and status.policy_version == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    ours = hf_logprobs(merged, prompt + list(comp.token_ids))[len(prompt) - 1 :]
    assert len(comp.token_ids) == 8 and max(abs(a - b) for a, b in zip(ours, comp.logprobs)) < 1e-3
