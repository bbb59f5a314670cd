"""Every command shown in a fenced code block of README.md and docs/*.md exists, with its flags.

An entry point of ours (`gkd-learner`, `gkd-rollout-server`, `python -m X`) must run `--help`, and
every `--flag` the command uses must appear in that help; `make T` needs the target T in the
Makefile. Other programs (docker, ray, export, ...) must be in EXTERNAL; `ray job submit ... --`
is followed into the command it runs. `--help` runs in a subprocess per program (it is fast:
heavy imports are lazy), so a flag another change adds shows up here by itself.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = {"gkd-learner": "learner", "gkd-rollout-server": "rollout_server"}
# Programs that are not ours: only their existence on a user's machine is assumed.
EXTERNAL = {"export", "docker", "openssl", "pip", "curl", "cd", "git", "nvidia-smi", "ray"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def fenced_commands(markdown: str) -> list[list[str]]:
    """The commands of every fenced block: continuation lines joined, comments dropped, split at
    `&&`, `||`, `;`, `|` and a trailing `&`; leading VAR=value assignments removed."""
    commands = []
    for block in FENCE.findall(markdown):
        text = re.sub(r"\\\n", " ", block)
        for line in text.splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError as e:
                raise AssertionError(f"cannot parse {line!r}: {e}") from None
            cmd: list[str] = []
            for w in [*words, ";"]:
                if w in ("&&", "||", ";", "|", "&"):
                    while cmd and re.fullmatch(r"\w+=.*", cmd[0]):
                        cmd.pop(0)
                    if cmd:
                        commands.append(cmd)
                    cmd = []
                else:
                    cmd.append(w.rstrip(";&"))
    return commands


@functools.cache
def help_text(module: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"python -m {module} --help failed:\n{r.stderr[-2000:]}"
    return r.stdout


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+):(?!=)", text, re.M))


def problems(cmd: list[str]) -> list[str]:
    """Why `cmd` (one command's words) is not a command of this repo, or [] if it is."""
    prog, args = cmd[0], cmd[1:]
    if prog == "ray" and "--" in args:  # `ray job submit ... -- <the job's command>`
        return problems(args[args.index("--") + 1 :])
    if prog in EXTERNAL:
        return []
    if prog == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t and t not in make_targets()]
        return [f"make: no target {t!r} in the Makefile" for t in missing]
    if prog in SCRIPTS:
        module = SCRIPTS[prog]
    elif re.fullmatch(r"python3?", prog) and args[:1] == ["-m"] and len(args) > 1:
        module, args = args[1], args[2:]
    else:
        return [f"{prog!r}: not an entry point of ours nor a known external program"]
    shown = help_text(module)
    flags = {a.split("=", 1)[0] for a in args if re.match(r"--[\w-]+", a)}
    return [
        f"{' '.join(cmd[:3])} ...: {f} is not in `python -m {module} --help`"
        for f in sorted(flags)
        if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", shown)
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_in_the_docs_exists(doc):
    commands = fenced_commands(doc.read_text())
    found = [p for cmd in commands for p in problems(cmd)]
    assert not found, f"{doc.relative_to(REPO)}:\n" + "\n".join(found)


def test_the_docs_show_our_commands():
    """The walk really sees the commands (an empty parse would pass everything)."""
    progs = {c[0] for doc in DOCS for c in fenced_commands(doc.read_text())}
    assert {"make", "gkd-learner", "gkd-rollout-server", "ray"} <= progs


@pytest.mark.parametrize(
    ("markdown", "needle"),
    [
        ("```bash\ngkd-learner --no_such_flag 1\n```\n", "--no_such_flag is not in"),
        ("```\nFOO=1 gkd-rollout-server --model m \\\n    --port_typo 5\n```\n", "--port_typo is not in"),
        ("```bash\ngkd-lerner --output_dir x\n```\n", "not an entry point"),
        ("```bash\npython -m deploy.ray_job --server_no_such 1 &\n```\n", "--server_no_such is not in"),
        ("```bash\nray job submit --address A -- python -m deploy.ray_job --bogus\n```\n", "--bogus"),
        ("```bash\nmake demo && make no-such-target\n```\n", "no target 'no-such-target'"),
        ("```bash\npython -m learner.no_such_module --help\n```\n", "--help failed"),
    ],
)
def test_a_wrong_command_is_caught(markdown, needle):
    try:
        found = [p for cmd in fenced_commands(markdown) for p in problems(cmd)]
    except AssertionError as e:
        found = [str(e)]
    assert any(needle in p for p in found), found
