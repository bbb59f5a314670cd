"""The GKD recipe: setup, train, save_checkpoint, cleanup — read it top to bottom.

One optimizer step = gradient_accumulation_steps micro-batches of per_device_train_batch_size
prompts. Each micro-batch's completions come from `Rollouts` (the student's own samples from the
rollout server with probability lmbda, else teacher-written ones); the student (with grad) and the
teacher (without) score them, and the generalized JSD on the completion tokens is backpropagated.
Every sync_steps the adapter goes to the server, which must then score the canary like we do.

Setup checks the cheap things first, in this order, before waiting for a server or loading a model:
the flags (already parsed), the dataset, the output directory (and the run in it: learner.identity),
the hub token. SIGTERM/SIGINT stop at the next step boundary with a checkpoint (learner.signals).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner import checkpoint, dist, identity, outputs, trl_runtime
from learner.accumulate import micro_batch_loss_sum, scale_to_step_tokens, update
from learner.checkpoint import TrainState
from learner.curve import curve_due, curve_point
from learner.data import Cursor, PromptSampler, load_data
from learner.errors import UserError
from learner.evaluate import evaluate, write_samples
from learner.metrics import MetricsLog
from learner.mismatch import (
    SERVER_LOGPROB_TEMPERATURE,
    MismatchMonitor,
    align,
    sampled_logprobs,
    token_mismatch,
)
from learner.models import eos_ids, load_adapter_tensors, load_models, load_tokenizer
from learner.reconnect import Reconnector
from learner.rollouts import STUDENT, Rollouts
from learner.signals import Interrupted, StopFlag
from learner.step import IGNORE, collate, completion_logits
from learner.sync import (
    adapter_sha,
    bring_server_to_checkpoint,
    canary_ids,
    check_fingerprint,
    push_adapter,
    wait_for_server,
)
from learner.teacher import LocalTeacher, MemoTeacher, open_remote
from shared.config import Config, rollout_url, write_resolved
from shared.messages import GenerateRequest, Prompt, SamplingSpec
from shared.transport.base import ServerUnavailable

log = logging.getLogger("gkd.learner")


def run(cfg: Config) -> dict[str, Any]:
    """Train end to end; return the last logged figures (train and eval)."""
    recipe = GKDRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        recipe.cleanup()


@dataclass
class Window:
    """Per-step figures accumulated between two log lines."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    grad_norms: list[float] = field(default_factory=list)


class GKDRecipe:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.client = None
        self.metrics: MetricsLog | None = None
        self.rollouts: Rollouts | None = None
        self.last: dict[str, Any] = {}
        self.teacher_eval_cache: dict[int, list[int]] = {}
        self.stop = StopFlag()
        self.dirty = False  # trained since the last push: the adapter differs from what its version names
        self.hub_repo: str | None = None
        self.pushes: list = []  # PushResults not yet in metrics.jsonl (one "push" row each)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        _configure_logging()
        self.stop.install()
        from learner.models import resolve_device

        trl_runtime.check(cfg, resolve_device(cfg.model.device))  # flags this device cannot honour
        trl_runtime.apply_precision(cfg)
        self.dist = dist.init(resolve_device(cfg.model.device))
        if self.dist.world_size > 1 and torch.cuda.is_available() and cfg.model.device in ("auto", "cuda"):
            torch.cuda.set_device(self.dist.local_rank)  # "cuda" then means this rank's GPU
        # Cheap checks first (nothing is written until models, data and server check out).
        self.eval_on = t.eval_strategy != "no"
        tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg)
        self.data = load_data(
            cfg, tokenizer, need_eval=self.eval_on or t.eval_on_start or t.curve_steps is not None
        )
        if self.dist.is_main:
            self._check_output_dir()
        self.plan = identity.plan(cfg)
        if self.dist.is_main and t.push_to_hub:
            self.hub_repo = outputs.check_hub(cfg, self.out)
        _seed_everything(t.seed)  # the same on every rank: identical LoRA init
        if t.torch_num_threads:
            torch.set_num_threads(t.torch_num_threads)

        from shared.transport import connect

        self.url = rollout_url(cfg)
        self.client = connect(
            self.url,
            token=cfg.rollout.token,
            timeout_s=cfg.rollout.request_timeout_s,
            max_message_mb=cfg.rollout.max_message_mb,
        )
        status = wait_for_server(self.client, self.url, cfg.rollout.reconnect_deadline_s)
        self.reconnector = Reconnector(self.client, self.url, cfg.rollout.reconnect_deadline_s, self._resync)
        log.info(
            "rollout server %s: model %s, version %d, %s, %s",
            self.url,
            status.model,
            status.policy_version,
            status.sync_mode,
            status.dtype,
        )
        if status.role == "teacher":
            raise UserError(
                f"rollout_url {self.url} is a teacher server (--role teacher), which takes no pushes; give the "
                "student's rollout server as --rollout_url and a teacher server as --teacher_url"
            )
        # A teacher server is checked (role, tokenizer, top-k) before any model loads.
        self.teacher = open_remote(cfg, tokenizer) if cfg.model.teacher_url else None
        check_fingerprint(status, cfg.model.model_name_or_path, self.url)  # before anything is pushed

        self.m = load_models(cfg)
        if self.teacher is None:
            self.teacher = LocalTeacher(
                self.m.teacher,
                self.m.teacher_device,
                vocab=self.m.vocab_size,
                pad_id=self.m.tokenizer.pad_token_id,
                eos_id=eos_ids(self.m.student, self.m.tokenizer),
            )
        else:
            self.teacher.vocab = self.m.vocab_size
        self.text_teacher = MemoTeacher(self.teacher)  # its fixed text, scored once for every evaluation
        self.dtype = next(self.m.student.parameters()).dtype
        dropout = any(isinstance(x, torch.nn.Dropout) and x.p > 0 for x in self.m.student.modules())
        if dropout:
            log.warning(
                "dropout is on (--disable_dropout false): the policy-mismatch check after pushes is off"
            )
        # Under --bf16 / --fp16 the forward (and so the learner's logprobs) runs in that dtype.
        compute = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else self.dtype
        self.mismatch = MismatchMonitor(
            compute, status.dtype, tf32=self.m.device.type == "cuda", hard_check=not dropout
        )
        self.canary = canary_ids(self.m.tokenizer)
        per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * self.dist.world_size
        self.total_steps = (
            t.max_steps
            if t.max_steps > 0
            else max(1, math.ceil(t.num_train_epochs * len(self.data.train) / per_step))
        )
        self.params = [p for p in self.m.student.parameters() if p.requires_grad]
        dist.broadcast_params(self.params, self.dist)
        self.optimizer = trl_runtime.optimizer(cfg, self.params, self.m.device)
        self.scheduler = trl_runtime.scheduler(cfg, self.optimizer, self.total_steps)

        self.state = TrainState(
            step=0, policy_version=0, cursor=Cursor(), micro_batches=0, world_size=self.dist.world_size
        )
        ckpt = self.plan.checkpoint
        if ckpt is not None:
            self._restore(ckpt)
        self._sync_server_at_start(resumed=ckpt is not None)
        if self.dist.is_main:
            self._prepare_output_dir()
        self.metrics = MetricsLog(
            self.out,
            resume_step=self.state.step if ckpt else None,
            enabled=self.dist.is_main,
            tensorboard="tensorboard" in trl_runtime.reporters(cfg),
            tensorboard_dir=t.logging_dir,
            sinks=trl_runtime.Reporters(cfg, self.dist.is_main),
        )
        if self.dist.is_main:
            self.metrics.log(
                self.state.step,
                {
                    "event": "start",
                    "total_steps": self.total_steps,
                    "run_id": self.plan.run.run_id,
                    "resumed_from": str(ckpt) if ckpt else None,
                    **_data_figures(self.data.report),
                },
            )
        self._log_pushes()
        self.rollouts = self._make_rollouts()

    def _check_output_dir(self) -> None:
        """Fail fast on an output_dir we could never write, without creating anything yet."""
        import os

        p = self.out.resolve()
        while not p.exists() and p != p.parent:
            p = p.parent
        if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
            why = "is not a directory" if not p.is_dir() else "is not writable"
            raise UserError(
                f"output_dir={str(self.out)!r} cannot be written: {str(p)!r} {why}; choose another --output_dir or fix its permissions"
            )

    def _prepare_output_dir(self) -> None:
        try:
            if self.plan.clear:
                identity.clear_run(self.out)
            write_resolved(self.cfg, self.out, self.plan.run.to_json())
        except OSError as e:
            raise UserError(f"output_dir={str(self.out)!r} is not writable: {e.strerror or e}") from None

    def _restore(self, path: Path) -> None:
        ck = checkpoint.load(path)
        if not ck["optimizer"]:
            raise UserError(
                f"checkpoint {path} was written with --save_only_model: it holds no optimizer, scheduler or "
                "RNG state and cannot be resumed; start a fresh run from its weights instead"
            )
        load_adapter_tensors(self.m.student, ck["adapter"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        checkpoint.restore_rng(ck)
        self.state = ck["state"]
        if self.state.world_size != self.dist.world_size:
            log.warning(
                "checkpoint written by %d ranks, resuming with %d: the data split changes",
                self.state.world_size,
                self.dist.world_size,
            )
            self.state.world_size = self.dist.world_size
        log.info(
            "resumed from %s at step %d (run %s, policy version %d, epoch %d, index %d)",
            path,
            self.state.step,
            self.plan.run.run_id,
            self.state.policy_version,
            self.state.cursor.epoch,
            self.state.cursor.index,
        )

    def _sync_server_at_start(self, resumed: bool) -> None:
        """Before any rollout, the server must serve exactly our adapter (fresh LoRA or checkpoint's)."""
        version = 0
        if self.dist.is_main:
            if resumed:
                version, push = bring_server_to_checkpoint(
                    self.client,
                    ckpt_version=self.state.policy_version,
                    pushed_sha=self.state.pushed_sha,
                    **self._push_kw(),
                )
            else:
                current = self.client.status(timeout_s=self.cfg.rollout.request_timeout_s).policy_version
                push = push_adapter(self.client, version=max(1, current + 1), **self._push_kw())
                version = push.version
            if push is not None:
                self.state.pushed_sha = push.sha256
                self.pushes.append(push)
                log.info(
                    "server now serves version %d (reload %.3fs, canary max |Δ| %.2e)",
                    push.version,
                    push.reload_s,
                    push.canary_max_abs,
                )
        self.state.policy_version = dist.broadcast_int(version, self.dist)
        self.mismatch.pushed(self.state.policy_version)

    def _make_rollouts(self) -> Rollouts:
        cfg = self.cfg
        accum = cfg.train.gradient_accumulation_steps
        sampler = PromptSampler(len(self.data.train), cfg.train.seed, cursor=self.state.cursor)
        sampling = SamplingSpec(
            temperature=cfg.gkd.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.gkd.max_new_tokens
        )

        def teacher_generate(examples, seed):
            return self.teacher.generate(
                [e.prompt_ids for e in examples],
                temperature=cfg.gkd.temperature,
                max_new_tokens=cfg.gkd.max_new_tokens,
                seed=seed,
            )

        return Rollouts(
            self.client,
            self.data.train,
            sampler,
            batch_size=cfg.train.per_device_train_batch_size,
            lmbda=cfg.gkd.lmbda,
            lmbda_schedule=cfg.gkd.lmbda_schedule,
            seq_kd=cfg.gkd.seq_kd,
            seed=cfg.train.seed,
            sampling=sampling,
            max_inflight=cfg.rollout.max_inflight,
            max_staleness=cfg.rollout.max_staleness,
            teacher_generate=teacher_generate,
            accum=accum,
            sync_steps=cfg.rollout.sync_steps,
            first_local=self.state.micro_batches,
            total_local=self.total_steps * accum,
            timeout_s=cfg.rollout.request_timeout_s,
            rank=self.dist.rank,
            world=self.dist.world_size,
            on_server_lost=self._rollouts_lost_server,
        )

    # ------------------------------------------------------------------ a server that goes away (learner.reconnect)

    def _resync(self, version: int) -> int:
        """Make the (possibly restarted) server serve our current adapter as `version`; return its version."""
        if not self.dist.is_main:  # rank 0 pushes; the others wait until it has (as long as rank 0 may try)
            # Rank 0 pushes our adapter as `version` again, or (trained since) as a new version above it.
            want = version + 1 if self.dirty else version
            deadline = time.monotonic() + self.cfg.rollout.reconnect_deadline_s
            while (served := self.client.status(timeout_s=10.0).policy_version) < want:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"rank {self.dist.rank}: the rollout server did not reach version {want} after a reconnect"
                    )
                time.sleep(0.5)
            return served if self.dirty else version
        served, push = bring_server_to_checkpoint(
            self.client, ckpt_version=version, pushed_sha=self.state.pushed_sha, **self._push_kw()
        )
        if push is not None:
            self.last_push, self.state.pushed_sha = push, push.sha256
            self.pushes.append(push)
        self.dirty = False
        self.mismatch.pushed(served)
        return served

    def _server_lost(self, why: str, version: int) -> int:
        served = self.reconnector.recover(why, version)
        self._log_pushes()
        if self.rollouts is not None:
            self.rollouts.resubmit(served)
        if self.metrics is not None:
            self._log_replica_events()
            self.metrics.log(
                self.state.step,
                {"event": "reconnect", "policy_version": served, **self.reconnector.outages[-1]},
            )
        return served

    def _log_replica_events(self) -> None:
        """replica_lost / replica_rejoined events of a replica set, into metrics.jsonl (rank 0)."""
        take = getattr(self.client, "take_events", None)
        for event in take() if take is not None else []:
            if self.metrics is not None:
                self.metrics.log(self.state.step, {"policy_version": self.state.policy_version, **event})

    def _replica_postfix(self) -> dict[str, str]:
        """Per replica, for the progress bar and the log line: version, queue depth, tokens/s."""
        return {
            f"r{i}": "lost"
            if f["state"] != "serving"
            else f"v{f['policy_version']} q{f['queue_depth']} {f['tokens_per_s'] or 0:.0f}tok/s"
            for i, f in enumerate(getattr(self, "replicas", []))
        }

    def _rollouts_lost_server(self, why: str) -> int:
        self.state.policy_version = self._server_lost(why, self.state.policy_version)
        return self.state.policy_version

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        from tqdm.auto import tqdm

        t, st = self.cfg.train, self.state
        if t.eval_on_start and st.step == 0:  # TRL's --eval_on_start
            self.evaluate()
        self._t_train0, self._curve_s, self._curve_last = time.perf_counter(), 0.0, None
        self.curve_if_due()
        bar = self._bar = tqdm(
            total=self.total_steps, initial=st.step, desc="gkd", unit="step", disable=not self.dist.is_main
        )
        window, saved = Window(), True
        self.stop.armed = True  # from here a signal waits for the step boundary
        while st.step < self.total_steps:
            t0, epoch_before = time.perf_counter(), st.cursor.epoch
            loss, tokens, grad_norm = self.optimizer_step()
            self.dirty = True
            st.step += 1
            st.cursor, st.micro_batches = (
                self.rollouts.consumed_cursor(),
                st.micro_batches + t.gradient_accumulation_steps,
            )
            self.sync_if_due()
            self._log_replica_events()
            window.losses.append(loss)
            window.tokens, window.seconds, window.steps = (
                window.tokens + tokens,
                window.seconds + time.perf_counter() - t0,
                window.steps + 1,
            )
            window.grad_norms.append(grad_norm)
            if st.step % t.logging_steps == 0 or st.step == self.total_steps:
                self.log_window(window)
                window = Window()
            if self.eval_on and self._eval_due(epoch_before):
                self.evaluate()
            self.curve_if_due()
            saved = st.step % t.save_steps == 0 or st.step == self.total_steps
            if saved:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", v=st.policy_version, **self._replica_postfix())
            if t.max_time_s is not None and self._train_s() >= t.max_time_s and st.step < self.total_steps:
                log.info(
                    "max_time_s=%g reached after step %d of %d: finishing",
                    t.max_time_s,
                    st.step,
                    self.total_steps,
                )
                if window.steps:
                    self.log_window(window)
                if not saved:
                    self.save_checkpoint()
                    saved = True
                break
            if self._stop_requested():
                if window.steps:
                    self.log_window(window)
                self._stop_with_checkpoint(saved)
        bar.close()
        self.stop.armed = False  # a signal during the final evaluation and saves stops at once
        if self._stop_requested():  # during the last step's evaluation or save: the checkpoint exists
            self._stop_with_checkpoint(saved=True)

    def _stop_requested(self) -> bool:
        """Did any rank get SIGTERM/SIGINT? (all ranks must stop at the same step)"""
        flag = 0.0 if self.stop.requested is None else float(self.stop.requested)
        return dist.all_mean([flag], self.dist)[0] > 0 if self.dist.world_size > 1 else flag > 0

    def _stop_with_checkpoint(self, saved: bool) -> None:
        import signal as _signal

        signum = self.stop.requested or _signal.SIGTERM
        if not saved:
            self.save_checkpoint()
        path = checkpoint.checkpoints_dir(self.out) / f"step-{self.state.step}"
        raise Interrupted(
            signum,
            f"{_signal.Signals(signum).name}: stopped after step {self.state.step}/{self.total_steps}; "
            f"checkpoint {path} written; continue with --resume latest",
        )

    def optimizer_step(self) -> tuple[float, int, float]:
        """Accumulate gradient_accumulation_steps micro-batches, then step; return (loss, tokens, grad norm).

        The step's loss is TRL's: the per-token losses of all its micro-batches (all ranks) summed
        and divided by their completion tokens (learner.accumulate.scale_to_step_tokens). With a
        teacher server the next micro-batch is sent for scoring while this one trains.
        """
        cfg, m = self.cfg, self.m
        accum = cfg.train.gradient_accumulation_steps
        loss_sum, tokens = 0.0, 0
        remote = self.teacher.remote
        ahead = self._next_scored()
        for i in range(accum):
            batch, pending, mb = ahead
            more = i + 1 < accum
            if remote and more:
                # Pipelined: the next rollout goes to the teacher server(s) while we train on this one.
                ahead = self._next_scored()
            if batch is not None:
                with trl_runtime.autocast(cfg, m.device):
                    s_logits = completion_logits(m.student, batch, m.vocab_size)
                    if mb.source == STUDENT and mb.logprobs is not None:
                        self._check_mismatch(s_logits, batch, mb)
                    mb_sum = micro_batch_loss_sum(
                        cfg, s_logits, self.teacher.collect(pending, batch), batch.labels
                    )
                mb_sum.backward()
                loss_sum += mb_sum.item()
                tokens += batch.n_tokens
            if not remote and more:
                ahead = self._next_scored()
        loss = scale_to_step_tokens(self.params, loss_sum, tokens, self.dist)
        grad_norm = update(cfg, self.params, self.optimizer, self.scheduler, self.dist)
        self.mismatch.stepped()
        return loss, tokens, grad_norm

    def _next_scored(self):
        """The next micro-batch as tensors on the student's device, already sent for scoring: (batch, pending)."""
        cfg, m = self.cfg, self.m
        mb = self.rollouts.next(self.state.policy_version)
        prompts = [e.prompt_ids for e in mb.examples]
        batch = collate(prompts, mb.completions, m.tokenizer.pad_token_id, cfg.data.max_length)
        if batch is None:
            return None, None, mb
        return (
            batch.to(m.device),
            self.teacher.submit(prompts, mb.completions, cfg.data.max_length, train=True),
            mb,
        )

    def _check_mismatch(self, s_logits: torch.Tensor, batch, mb) -> None:
        """The server's logprobs of its own samples against ours, from the loss's own logits (no
        second forward); right after a push, beyond the dtype's bound, a hard error."""
        with torch.no_grad():
            learner_lp = sampled_logprobs(s_logits, batch.labels, SERVER_LOGPROB_TEMPERATURE)
        stats = token_mismatch(learner_lp, align(mb.logprobs, batch.labels), batch.labels != IGNORE)
        problem = self.mismatch.observe(stats, mb.policy_version, self.state.policy_version)
        if problem:
            raise UserError(problem)

    def _push_kw(self) -> dict[str, Any]:
        """What every push of the student needs besides the client and its version."""
        m = self.m
        return dict(
            student=m.student,
            lora=m.lora,
            canary=self.canary,
            device=m.device,
            dtype=self.dtype,
            timeout_s=self.cfg.rollout.request_timeout_s,
        )

    def sync_if_due(self) -> None:
        st = self.state
        if st.step % self.cfg.rollout.sync_steps and st.step != self.total_steps:
            return
        version = st.policy_version + 1  # every rank counts pushes the same way; rank 0's push makes it so
        self.dirty = False
        if self.dist.is_main:
            self.state.pushed_sha = adapter_sha(
                self.m.student
            )  # what `version` names, even if the push fails
            try:
                self.last_push = push = push_adapter(self.client, version=version, **self._push_kw())
                self.pushes.append(push)
            except ServerUnavailable as e:
                version = self._server_lost(str(e), version)
        st.policy_version = version
        self.mismatch.pushed(version)
        self._log_pushes()

    def _log_pushes(self) -> None:
        """One metrics row per push: which adapter (sha256) each version number names."""
        if self.metrics is None:
            return
        for p in self.pushes:
            self.metrics.log(
                self.state.step, {"event": "push", "policy_version": p.version, "sha256": p.sha256}
            )
        self.pushes.clear()

    def _eval_due(self, epoch_before: int) -> bool:
        t, st = self.cfg.train, self.state
        if t.eval_strategy == "steps":
            return st.step % (t.eval_steps or t.logging_steps) == 0 and st.step != self.total_steps
        return (
            st.cursor.epoch > epoch_before and st.step != self.total_steps
        )  # "epoch"; the end is evaluated by finish()

    # ------------------------------------------------------------------ logging and evaluation

    def log_window(self, w: Window) -> None:
        stats = self.rollouts.reset_stats().summary()
        finite = [x for x in w.losses if math.isfinite(x)]
        loss, tokens = dist.all_mean(
            [sum(finite) / len(finite) if finite else float("nan"), float(w.tokens)], self.dist
        )
        row = {
            "policy_version": self.state.policy_version,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": sum(w.grad_norms) / len(w.grad_norms),
            **stats,
            "seconds_per_step": w.seconds / w.steps,
            "tokens_per_s": tokens * self.dist.world_size / w.seconds if w.seconds else 0.0,
            "epoch": self.state.cursor.epoch + self.state.cursor.index / len(self.data.train),
            "data_epoch": self.state.cursor.epoch,
            "data_index": self.state.cursor.index,
            **self.mismatch.take(),
        }
        if self.teacher.remote:  # time blocked on teacher scores, and positions scored, since the start
            row.update(teacher_wait_s=self.teacher.wait_s, teacher_positions=self.teacher.positions)
        push = getattr(self, "last_push", None)
        if push is not None:
            row.update(reload_s=push.reload_s, push_s=push.push_s, canary_max_abs=push.canary_max_abs)
        figures = getattr(self.client, "replica_figures", None)  # a replica set (several --rollout_url)
        if figures is not None and self.dist.is_main:
            self.replicas = row["replicas"] = figures()
        self.last.update(row)
        if self.dist.is_main:
            self.metrics.log(self.state.step, row)
            log.info(
                "step %d/%d loss %.4f v%d on-policy %.2f staleness %s %.2fs/step%s",
                self.state.step,
                self.total_steps,
                loss,
                row["policy_version"],
                row["on_policy_fraction"],
                row["staleness"],
                row["seconds_per_step"],
                "".join(f" {k}={v}" for k, v in self._replica_postfix().items()),
            )

    def evaluate(self) -> dict[str, float]:
        """Student samples (server, current version) and teacher text vs the teacher; rank 0 only."""
        if not self.dist.is_main:
            return {}
        cfg, m, ex = self.cfg, self.m, self.data.eval
        prompts = [e.prompt_ids for e in ex]
        sampling = SamplingSpec(
            temperature=cfg.gkd.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cfg.gkd.max_new_tokens,
            seed=cfg.train.seed,
        )
        req = GenerateRequest(
            request_id=f"eval-{self.state.step}",
            prompts=[Prompt(prompt_id=str(i), token_ids=p) for i, p in enumerate(prompts)],
            sampling=sampling,
            min_version=self.state.policy_version,
        )
        student_c = [c.token_ids for c in self._generate_surviving_outages(req).completions]
        teacher_c = self._teacher_texts()
        figures = evaluate(
            m.student,
            self.teacher,
            prompts,
            student_completions=student_c,
            teacher_completions=teacher_c,
            text_teacher=self.text_teacher,
            **self._scoring_kw(),
        )
        write_samples(
            self.out / "samples.jsonl",
            self.state.step,
            m.tokenizer,
            [e.prompt_text for e in ex],
            student_c,
            teacher_c,
        )
        self.metrics.log(self.state.step, {"policy_version": self.state.policy_version, **figures})
        self.last.update(figures)
        log.info(
            "eval @%d: %s",
            self.state.step,
            " ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in figures.items()),
        )
        return figures

    def _train_s(self) -> float:
        """Seconds since training began, less the time the curve points took."""
        return time.perf_counter() - self._t_train0 - self._curve_s

    def curve_if_due(self, final: bool = False) -> None:
        """A curve point (learner.curve) at step 0, every curve_steps and at the last step; rank 0 only."""
        cfg, st = self.cfg, self.state
        due = curve_due(st.step, cfg.train.curve_steps, self.total_steps) or (
            final and cfg.train.curve_steps is not None
        )
        if not due or not self.dist.is_main or self._curve_last == st.step:
            return
        t0, m = time.perf_counter(), self.m
        n = cfg.data.curve_samples
        figures = curve_point(
            m.student,
            self.text_teacher,  # batched as the evaluation: the teacher's side is memoized
            [e.prompt_ids for e in self.data.eval[:n]],
            self._teacher_texts()[:n],
            **self._scoring_kw(),
        )
        row = {
            **figures,
            "curve/train_s": round(self._train_s(), 2),
            "curve/samples": min(n, len(self.data.eval)),
        }
        self._curve_s += time.perf_counter() - t0
        self._curve_last = st.step
        self.metrics.log(st.step, row)
        log.info(
            "curve @%d: jsd=%.4f (%.1fs)",
            st.step,
            figures.get("curve/teacher_text/jsd", float("nan")),
            time.perf_counter() - t0,
        )

    def _generate_surviving_outages(self, req: GenerateRequest):
        """client.generate, re-asked (at the version re-synced) after the server comes back."""
        base_id, n = req.request_id, 0
        while True:
            try:
                return self.client.generate(req, timeout_s=self.cfg.rollout.request_timeout_s)
            except ServerUnavailable as e:
                self.state.policy_version = req.min_version = self._server_lost(
                    str(e), self.state.policy_version
                )
                n += 1
                req.request_id = f"{base_id}-r{n}"

    def _scoring_kw(self) -> dict:
        """How the evaluation and the curve score text: the same beta, batching and device."""
        cfg, m = self.cfg, self.m
        return dict(
            beta=_eval_beta(cfg),
            vocab=m.vocab_size,
            pad_id=m.tokenizer.pad_token_id,
            max_length=cfg.data.max_length,
            batch_size=cfg.train.per_device_eval_batch_size,
            device=m.device,
        )

    def _teacher_texts(self) -> list[list[int]]:
        """The dataset's completions; for prompt-only rows, teacher samples (generated once, cached)."""
        cfg, ex = self.cfg, self.data.eval
        missing = [
            i for i, e in enumerate(ex) if e.completion_ids is None and i not in self.teacher_eval_cache
        ]
        if missing:
            gen = self.teacher.generate(
                [ex[i].prompt_ids for i in missing],
                temperature=cfg.gkd.temperature,
                max_new_tokens=cfg.gkd.max_new_tokens,
                seed=cfg.train.seed + 1,
            )
            self.teacher_eval_cache.update(zip(missing, gen))
        return [
            e.completion_ids if e.completion_ids is not None else self.teacher_eval_cache[i]
            for i, e in enumerate(ex)
        ]

    # ------------------------------------------------------------------ checkpoints and outputs

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            from learner.models import adapter_tensors

            run = self.plan.run
            only_model = self.cfg.train.save_only_model  # TRL: weights only, not resumable
            path = checkpoint.save(
                self.out,
                self.state,
                adapter_tensors(self.m.student),
                {} if only_model else self.optimizer.state_dict(),
                {} if only_model else self.scheduler.state_dict(),
                run={**run.to_json(), "settings": run.settings},
            )
            log.info("checkpoint %s", path)
            limit = self.cfg.train.save_total_limit
            if limit:
                for old in checkpoint.prune(self.out, limit, run.run_id):
                    log.info("save_total_limit=%d: removed %s", limit, old)
        dist.barrier(self.dist)

    def _save_outputs(self) -> None:
        m, t = self.m, self.cfg.train
        outputs.save_adapter(m.student, m.tokenizer, self.out)
        outputs.write_model_card(
            self.cfg,
            self.out,
            {k: v for k, v in self.last.items() if k.startswith("eval/") or k == "loss"},
        )
        if t.save_merged:
            path = outputs.save_merged(m.student, m.tokenizer, self.out)
            log.info("merged model: %s", path)
        log.info("adapter, model card and metrics are in %s", self.out)
        if t.push_to_hub:
            outputs.push_to_hub(self.cfg, self.out, self.hub_repo)

    def finish(self) -> dict[str, Any]:
        """Final evaluation, then the adapter, merged model, model card and (optionally) the hub upload."""
        self.curve_if_due(final=True)
        if self.eval_on:
            self.evaluate()
        if self.dist.is_main:
            with outputs.disk_errors_as_oserror(self.out):
                self._save_outputs()
        dist.barrier(self.dist)
        digest = adapter_digest(self.params)
        log.info(
            "rank %d/%d finished at step %d, policy version %d, adapter digest %s",
            self.dist.rank,
            self.dist.world_size,
            self.state.step,
            self.state.policy_version,
            digest,
        )
        return dict(
            self.last, step=self.state.step, policy_version=self.state.policy_version, adapter_digest=digest
        )

    def cleanup(self) -> None:
        if self.client is not None:
            self._log_replica_events()
        self.stop.armed = False
        if getattr(self, "_bar", None) is not None:
            self._bar.close()  # now, not at exit: the CLI's one-line error must be the last thing on stderr
        if self.rollouts is not None:
            self.rollouts.close()
        if self.client is not None:
            self.client.close()
        if getattr(self, "teacher", None) is not None:
            self.teacher.close()
        if self.metrics is not None:
            self.metrics.close()
        if hasattr(self, "dist"):
            dist.shutdown(self.dist)


def adapter_digest(params) -> str:
    """A short hash of the trainable weights: equal on every rank when gradients were averaged."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _data_figures(report) -> dict[str, Any]:
    return {
        "data_rows": report.rows,
        "train_prompts": report.train,
        "eval_prompts": report.eval,
        "overlong_prompts": report.overlong,
        "overlong_action": report.overlong_action,
        "data_shape": report.shape,
    }


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _eval_beta(cfg: Config) -> float:
    """The beta of the evaluation's JSD: eval_beta, else the training beta."""
    return cfg.gkd.beta if cfg.gkd.eval_beta is None else cfg.gkd.eval_beta
