"""Staleness: a rollout sampled by a policy version newer than the learner's is an error.

Real server, real ZeroMQ client and the learner's real Rollouts; the test itself pushes an adapter
the learner never made, as another learner pointed at the same server would.
"""

from __future__ import annotations

import pytest
from test_faults import FLAGS


@pytest.mark.slow
def test_rollout_newer_than_the_learner_is_an_error(server_pool, make_adapter):
    from learner.data import Example, PromptSampler
    from learner.errors import UserError
    from learner.rollouts import Rollouts
    from shared.messages import SamplingSpec

    srv = server_pool.get(fresh=False, **FLAGS)
    with srv.client(timeout_s=120) as c:
        v = c.status().policy_version
        c.push_adapter(make_adapter(r=8, seed=3).push(v + 2))  # "someone else" is ahead of the learner
        rollouts = Rollouts(
            c,
            [Example([5, 6, 7, 8 + i], None, f"p{i}") for i in range(4)],
            PromptSampler(4, seed=0),
            batch_size=2,
            lmbda=1.0,
            seq_kd=False,
            seed=0,
            sampling=SamplingSpec(max_new_tokens=4),
            max_inflight=1,
            max_staleness=0,
            teacher_generate=lambda examples, seed: [],
            accum=1,
            sync_steps=1,
            first_local=0,
            total_local=2,
            timeout_s=120,
        )
        with pytest.raises(UserError, match=rf"policy version {v + 2}, newer than the learner's {v + 1}"):
            rollouts.next(v + 1)
        rollouts.close()
