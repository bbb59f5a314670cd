"""Riding out a rollout server that goes away mid-run: notice, wait with bounded backoff, re-sync.

A server can die or restart under a run (OOM kill, preemption, a redeploy). The ZeroMQ client fails
every outstanding request with ServerUnavailable as soon as the connection drops, so the learner
notices within a poll interval, not at its request timeout. `Reconnector.recover` then:

1. logs the loss at once;
2. probes the server's status with exponentially growing timeouts (0.5 s, 1 s, 2 s, ... capped at
   MAX_PROBE_S) until it answers, or fails with a UserError (one line, exit 2) once
   `reconnect_deadline_s` has passed since the loss;
3. pushes the learner's current adapter (canary-checked) before any rollout is used: a restarted
   server comes back at version 0 serving the bare base model.

The caller re-requests the lost rollouts with `min_version` set to the version returned here, so no
optimizer step is lost or repeated and none trains on samples from other weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from learner.errors import UserError
from shared.transport.base import ServerUnavailable

log = logging.getLogger("gkd.learner")

FIRST_PROBE_S = 0.5
MAX_PROBE_S = 8.0


class Reconnector:
    def __init__(self, client, url: str, deadline_s: float, resync: Callable[[int], int]):
        """`resync(version)` makes the server serve our adapter as `version` (or later); returns it."""
        self.client, self.url, self.deadline_s, self.resync = client, url, deadline_s, resync
        self.outages: list[dict[str, float]] = []  # one entry per recovered outage, for the metrics log

    def recover(self, why: str, version: int) -> int:
        """Wait for the server, bring it to our adapter at `version`; return the version it serves."""
        t_lost = time.monotonic()
        deadline = t_lost + self.deadline_s
        log.warning(
            "rollout server %s lost (%s); retrying for up to %gs (--reconnect_deadline_s)",
            self.url,
            why,
            self.deadline_s,
        )
        probe, attempts = FIRST_PROBE_S, 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(
                    f"rollout server {self.url} went away ({why}) and did not come back within {self.deadline_s:g}s "
                    f"after {attempts} attempts; restart gkd-rollout-server on the same address, then rerun with "
                    "--resume latest (or raise --reconnect_deadline_s)"
                )
            attempts += 1
            try:
                self.client.status(timeout_s=min(probe, left))
                served = self.resync(version)
            except ServerUnavailable as e:
                why = str(e)
                log.info(
                    "rollout server %s: attempt %d failed (%s); next probe waits %.1fs",
                    self.url,
                    attempts,
                    why,
                    min(2 * probe, MAX_PROBE_S),
                )
                probe = min(2 * probe, MAX_PROBE_S)
                continue
            down_s = time.monotonic() - t_lost
            log.warning(
                "rollout server %s is back after %.1fs; it serves our adapter as version %d",
                self.url,
                down_s,
                served,
            )
            self.outages.append({"down_s": down_s, "attempts": float(attempts), "version": float(served)})
            return served
