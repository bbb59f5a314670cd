"""`make demo`: distil the embedded default end to end, then show the result.

    prepare (cached) -> rollout server on the pruned student (child process, ZeroMQ)
    -> gkd-learner (child process, demo/demo.yaml; evaluates at step 0, every eval_steps and at the end;
       pushes adapters every sync_steps; saves the merged model)
    -> student-merged/ -> rollout server on it with the OpenAI endpoint, one chat question
    -> demo-output/metrics.jsonl, report.md, plots; the quality verdict.

Every process started here runs in its own process group and is stopped (SIGTERM, then SIGKILL)
in a `finally`, also on failure or Ctrl-C. Exit codes: 0 done (the quality verdict, MET or
MISSED, is printed and written to the report: a demo that ran to the end worked, whatever its
figures), 2 a stage failed (one line on stderr, the logs say more).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

CONFIG = Path(__file__).parent / "demo.yaml"
CHAT_QUESTION = "Explain in two sentences why we need to sleep."
QUICK_ENV = "GKD_DEMO_QUICK"
# The shortened run (`--quick`, or GKD_DEMO_QUICK=1): what tests/test_demo.py runs when there is no
# finished `make demo` to read. Same model, data and settings; fewer steps and evaluations.
QUICK_OVERRIDES = ["--max_steps", "15", "--eval_steps", "15", "--eval_samples", "24"]


class StageFailed(RuntimeError):
    """A stage of the demo failed; the message is the one line to print."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m demo.run",
        description="Run the embedded GKD demo end to end (see demo/README in the report).",
    )
    p.add_argument("--out", default="demo-output", help="Output root (default: demo-output).")
    p.add_argument("--config", default=str(CONFIG), help="Learner config (seed-style YAML).")
    p.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get(QUICK_ENV) == "1",
        help=f"Shortened run (fewer steps; also env {QUICK_ENV}=1).",
    )
    p.add_argument("--drop_every", type=int, default=None, help="Passed to demo.prepare (default: its own).")
    p.add_argument(
        "--learner_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="Everything after this flag is passed to gkd-learner (overrides the config).",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    root = Path(args.out)
    # Server and learner share two cores: OpenMP threads that spin while waiting (torch's default)
    # steal them from the other process (measured in bench.common.setup_process: a step 47-49 s vs
    # 8-9 s with passive waiting). Every process the demo starts inherits this.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        code = run(
            root,
            Path(args.config),
            quick=args.quick,
            drop_every=args.drop_every,
            learner_args=args.learner_args,
        )
    except StageFailed as e:
        sys.stderr.write(f"demo: error: {e}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        sys.stderr.write("demo: interrupted (every process it started was stopped)\n")
        raise SystemExit(130) from None
    raise SystemExit(code)


def run(root: Path, config: Path, *, quick: bool, drop_every: int | None, learner_args: list[str]) -> int:
    from demo import prepare as P
    from demo import report
    from demo.procs import ProcessFailed

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    _banner(f"gkd demo -> {root}/ ({'quick' if quick else 'full'} run; logs in {logs}/)")

    overrides = (QUICK_OVERRIDES if quick else []) + learner_args
    t0 = time.perf_counter()
    try:
        kw = {} if drop_every is None else {"drop_every": drop_every or None}
        data, eval_samples = P.settings_from_config(config)
        eval_samples = int(_flag(overrides, "--eval_samples") or eval_samples)
        prep = P.prepare(root, data=data, eval_samples=eval_samples, **kw)
    except P.PrepareError as e:
        raise StageFailed(f"prepare: {e}") from None
    except ProcessFailed as e:
        raise StageFailed(f"prepare: {e}") from None
    timings["prepare_s"] = time.perf_counter() - t0

    learner_out = root / "learner"
    try:
        train = train_stage(root, prep, config, learner_out, overrides, logs)
    except ProcessFailed as e:
        raise StageFailed(str(e)) from None
    timings.update(train.pop("timings"))

    t0 = time.perf_counter()
    merged = root / "student-merged"
    link_tree(learner_out / "merged", merged)
    try:
        chat = chat_stage(merged, logs)
    except ProcessFailed as e:
        raise StageFailed(f"serving the merged model: {e}") from None
    timings["chat_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    summary = report.build_summary(root, learner_out, prep, timings, train, chat, quick=quick)
    report.write_metrics(root, learner_out, summary)
    path = report.write_report(root)
    verdict = summary["quality"]
    _banner(f"report: {path}")
    print(
        f"The distilled student (vLLM, OpenAI endpoint) was asked: {CHAT_QUESTION!r}\n  -> {chat['answer']!r}"
    )
    for line in report.quality_lines(verdict):
        print(line)
    print(f"demo took {timings['total_s'] / 60:.1f} min")
    return 0


# ---------------------------------------------------------------- training


def train_stage(root: Path, prep, config: Path, learner_out: Path, overrides: list[str], logs: Path) -> dict:
    """Rollout server on the pruned student + gkd-learner, both child processes; returns what was watched."""
    from demo.procs import ProcessFailed, RolloutServer, log_tail, start, stop, venv_script

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    server = RolloutServer(prep.student, logs / "server-student.log", extra=["--max_model_len", "1024"])
    learner = None
    monitor = None
    try:
        server.wait_ready(desc="starting the rollout server (pruned student)")
        timings["student_server_start_s"] = server.ready_s
        shutil.rmtree(learner_out, ignore_errors=True)
        cmd = venv_script("gkd-learner", "learner.cli") + [
            "--config",
            str(config),
            "--model_name_or_path",
            str(prep.student),
            "--teacher_model_name_or_path",
            str(prep.teacher),
            "--dataset_name",
            str(prep.data),
            "--output_dir",
            str(learner_out),
            "--rollout_url",
            server.url,
            "--save_merged",
            *overrides,
        ]
        t_learn = time.perf_counter()
        learner = start(cmd, logs / "learner.log")
        monitor = ServerMonitor(server.url)
        monitor.start()
        total = config_steps(config, overrides)
        watch_learner(learner, learner_out, total, logs / "learner.log")
        timings["learner_s"] = time.perf_counter() - t_learn
        if learner.returncode != 0:
            raise ProcessFailed(
                f"gkd-learner exited with code {learner.returncode}; {logs / 'learner.log'} ends:\n{log_tail(logs / 'learner.log')}"
            )
        if not (learner_out / "merged" / "config.json").exists():
            raise ProcessFailed(
                f"gkd-learner finished without {learner_out / 'merged'} (was --save_merged honoured?)"
            )
    finally:
        if monitor is not None:
            monitor.stop()
        stop(learner)
        server.stop()
    timings["train_stage_s"] = time.perf_counter() - t0
    return {
        "timings": timings,
        "server_samples": monitor.samples if monitor else [],
        "server_start_s": server.ready_s,
    }


def _flag(args: list[str], name: str) -> str | None:
    """The value of the last `name VALUE` pair in a flag list (None if absent)."""
    value = None
    for i, a in enumerate(args[:-1]):
        if a == name:
            value = args[i + 1]
    return value


def config_steps(config: Path, overrides: list[str]) -> int:
    import yaml

    given = _flag(overrides, "--max_steps")
    return int(given) if given else int((yaml.safe_load(config.read_text()) or {}).get("max_steps", 0))


def watch_learner(proc, out: Path, total: int, log_path: Path) -> None:
    """A progress bar over the learner's optimizer steps, read from its metrics.jsonl as it grows."""
    from tqdm import tqdm

    metrics = out / "metrics.jsonl"
    seen, last_step = 0, 0
    with tqdm(total=total or None, desc="distilling (gkd-learner)", unit="step") as bar:
        while True:
            done = proc.poll() is not None
            rows = _read_new(metrics, seen)
            seen += len(rows)
            for r in rows:
                step = int(r.get("step", 0))
                if step > last_step:
                    bar.update(step - last_step)
                    last_step = step
                post = {}
                if r.get("loss") is not None:
                    post["loss"] = f"{r['loss']:.3f}"
                if r.get("eval/teacher_text/jsd") is not None:
                    post["heldout_jsd"] = f"{r['eval/teacher_text/jsd']:.3f}"
                if post:
                    bar.set_postfix(post)
            if done:
                return
            time.sleep(1.0)


def _read_new(path: Path, skip: int) -> list[dict]:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []
    out = []
    for line in lines[skip:]:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now; read it next time
            break
    return out


class ServerMonitor:
    """Polls the rollout server's status every few seconds from a thread with its own client."""

    def __init__(self, url: str, every_s: float = 5.0):
        self.url, self.every_s = url, every_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _loop(self) -> None:
        from shared.transport import connect

        client = connect(self.url, timeout_s=10.0)
        t0 = time.monotonic()
        try:
            while not self._stop.wait(self.every_s):
                try:
                    st = client.status(timeout_s=10.0)
                except Exception:  # noqa: BLE001 - a busy or restarting server: skip this sample
                    continue
                self.samples.append(
                    {
                        "t_s": round(time.monotonic() - t0, 1),
                        "policy_version": st.policy_version,
                        "tokens_per_s": st.tokens_per_s,
                        "queue_depth": st.queue_depth,
                        "last_reload_s": st.last_reload_s,
                    }
                )
        finally:
            client.close()


# ---------------------------------------------------------------- the merged model


def link_tree(src: Path, dst: Path) -> None:
    """dst becomes a copy of src (hard links where the filesystem allows: no extra space)."""
    shutil.rmtree(dst, ignore_errors=True)

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def chat_stage(merged: Path, logs: Path) -> dict:
    """Serve the merged model (vLLM, via gkd-rollout-server) and ask one question over the OpenAI API."""
    from openai import OpenAI

    from demo.procs import RolloutServer, free_port

    http_port = free_port()
    server = RolloutServer(
        merged, logs / "server-merged.log", http_port=http_port, extra=["--max_model_len", "1024"]
    )
    try:
        server.wait_ready(desc="starting the rollout server (distilled, merged model)")
        client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", timeout=300)
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model="student",
            messages=[{"role": "user", "content": CHAT_QUESTION}],
            max_tokens=96,
            temperature=0.0,
        )
        return {
            "question": CHAT_QUESTION,
            "answer": r.choices[0].message.content,
            "seconds": round(time.perf_counter() - t0, 2),
            "server_start_s": server.ready_s,
            "http_port": http_port,
        }
    finally:
        server.stop()


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


if __name__ == "__main__":
    main()
