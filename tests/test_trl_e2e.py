"""TRL command lines end to end against a real rollout server (tiny models, fp32 CPU).

* full fine-tuning (`--use_peft false`, TRL's default): the student trains in full, pushes carry
  whole tensors through the same reload and canary check, and the output is a full model that
  loads in transformers and that the server serves;
* the seed command with TRL-style extras (`--bf16 --report_to tensorboard --warmup_steps 2
  --save_total_limit 1 --logging_steps 1`).
"""

from __future__ import annotations

import math
import subprocess

import pytest

from learner import checkpoint
from learner.metrics import read
from shared.messages import GenerateRequest, Prompt, SamplingSpec
from tests.conftest import REPO, learner_argv, learner_env

pytestmark = pytest.mark.slow

SERVER_FLAGS = {"max_lora_rank": 64}  # the same server test_learner_integration uses (r=64 fits)


@pytest.fixture
def server(server_pool):
    return server_pool.get(fresh=False, **SERVER_FLAGS)


def _run(argv, log_path, timeout=900):
    with open(log_path, "w") as log:
        res = subprocess.run(
            argv, stdout=log, stderr=subprocess.STDOUT, env=learner_env(), cwd=REPO, timeout=timeout
        )
    return res.returncode, log_path.read_text()


def test_full_fine_tuning_trains_pushes_and_saves_a_full_model(tiny_models, tiny_dataset, tmp_path, server):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    argv = learner_argv(tiny_models, tiny_dataset, out, server.url, "--use_peft", "false", "--max_steps", "3")
    argv += ["--lmbda", "1", "--save_steps", "2", "--torch_num_threads", "1"]
    rc, log = _run(argv, tmp_path / "learner.log")
    assert rc == 0, log[-3000:]
    rows = [r for r in read(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["canary_max_abs"] <= 1e-3 for r in rows)  # every full push passed the canary
    pushes = [r for r in read(out) if r.get("event") == "push"]
    assert len(pushes) == 4  # the start, then one per step

    # the output: a full model (not an adapter) that transformers loads, changed by training
    assert not (out / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    initial = AutoModelForCausalLM.from_pretrained(str(tiny_models.student), dtype=torch.float32)
    changed = [
        n for n, p in trained.named_parameters() if not torch.equal(p, dict(initial.named_parameters())[n])
    ]
    assert len(changed) > len(list(trained.parameters())) // 2, changed  # full fine-tuning, not a few modules
    # the checkpoint holds the full weights too
    ck = checkpoint.load(checkpoint.find_latest(out))
    assert set(ck["adapter"]) == {n for n, _ in trained.named_parameters()}

    # the server serves exactly the saved model: its greedy continuation, scored by transformers
    prompt = [5, 17, 42, 99, 3, 250]
    with server.client() as c:
        comp = c.generate(
            GenerateRequest(
                request_id="full-check",
                prompts=[Prompt(prompt_id="0", token_ids=prompt)],
                sampling=SamplingSpec(temperature=0.0, max_new_tokens=8, seed=0),
            )
        ).completions[0]
    ids = prompt + list(comp.token_ids)
    with torch.no_grad():
        lp = torch.log_softmax(trained(torch.tensor([ids])).logits[0], -1)
    ours = [lp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids))]
    assert max(abs(a - b) for a, b in zip(ours, comp.logprobs)) < 1e-3


def test_seed_command_with_trl_extras(tiny_models, tiny_dataset, tmp_path, server):
    """The seed's flags (sizes scaled to the tiny models) plus TRL-style extras, through the CLI."""
    out = tmp_path / "gkd-model"
    argv = learner_argv(tiny_models, tiny_dataset, out, server.url)
    argv += ["--learning_rate", "2e-4", "--num_train_epochs", "1", "--max_steps", "3"]
    argv += ["--gradient_checkpointing", "--use_peft", "--lora_r", "64", "--lora_alpha", "16"]
    argv += ["--bf16", "--report_to", "tensorboard", "--warmup_steps", "2", "--save_total_limit", "1"]
    argv += [
        "--logging_steps",
        "1",
        "--save_steps",
        "1",
        "--dataloader_num_workers",
        "2",
        "--torch_num_threads",
        "1",
    ]
    rc, log = _run(argv, tmp_path / "learner.log")
    assert rc == 0, log[-3000:]
    assert "these TRL flags have no effect here: --dataloader_num_workers" in log
    rows = [r for r in read(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    # linear warmup over 2 steps, then linear decay to 0 at step 3 (HF's schedule)
    assert [round(r["lr"], 10) for r in rows] == [1e-4, 2e-4, 0.0]
    assert all(r["canary_max_abs"] <= 1e-3 for r in rows)
    assert [p.name for p in checkpoint.checkpoints_dir(out).iterdir() if p.name.startswith("step-")] == [
        "step-3"
    ]
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "runs").iterdir())
    assert (out / "adapter_config.json").exists()
