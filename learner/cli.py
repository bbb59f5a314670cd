"""`gkd-learner`: parse and validate the config, then run the recipe.

Thin on purpose: nothing here imports torch, transformers or vLLM, so `--help` and config mistakes
answer instantly. Known user errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import sys

from learner.errors import UserError
from shared.config import ConfigError, exit_on_config_error, parse_args
from shared.transport.base import RemoteError, ServerUnavailable
from shared.trl_flags import warning_line

PROG = "gkd-learner"
DESCRIPTION = (
    "On-policy knowledge distillation (GKD, Agarwal et al. 2024) of a LoRA student: pulls rollouts "
    "from a gkd-rollout-server, trains on the generalized JSD to the teacher, pushes adapters back. "
    "Accepts the flags of TRL's examples/scripts/gkd.py."
)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, ns = parse_args(argv, prog=PROG, description=DESCRIPTION)
    except ConfigError as e:
        exit_on_config_error(PROG, e)
    if ns.trl_no_effect:  # one line, before anything heavy loads
        sys.stderr.write(f"{PROG}: warning: {warning_line(ns.trl_no_effect)}\n")
    from learner.recipe import run  # heavy: torch, transformers, peft
    from learner.signals import Interrupted

    try:
        run(cfg)
    except Interrupted as e:  # SIGTERM / SIGINT: 143 / 130, after a checkpoint when training had started
        sys.stderr.write(f"{PROG}: {_one_line(e)}\n")
        raise SystemExit(e.code) from None
    except (UserError, ServerUnavailable, RemoteError) as e:
        sys.stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        raise SystemExit(2) from None
    except OSError as e:
        if e.errno not in _DISK_ERRORS:  # anything else is a bug: keep its traceback
            raise
        sys.stderr.write(
            f"{PROG}: error: cannot write {e.filename or cfg.train.output_dir}: {e.strerror}; free space or fix "
            f"permissions, then rerun with --resume latest (complete checkpoints in {cfg.train.output_dir}/checkpoints are intact)\n"
        )
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        raise SystemExit(130) from None


# A full disk, a file-size limit, a read-only or forbidden output directory: the user's to fix.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, ServerUnavailable):
        return f"rollout server unavailable: {text}"
    if isinstance(e, RemoteError):
        return f"rollout server refused the request: {text}"
    return text


if __name__ == "__main__":
    main()
