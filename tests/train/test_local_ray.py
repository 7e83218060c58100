"""train/local_ray.py: on a Ray this process started, a fixed-size run asks no autoscaler for nodes."""

from __future__ import annotations

from ray.train import ScalingConfig
from ray.train.v2._internal.execution.scaling_policy import (ElasticScalingPolicy, FixedScalingPolicy,
                                                             ResizeDecision)

from mtnlg_ray.train.local_ray import NoAutoscalerPolicy, scaling_policy, started_here


class _RunContext:
    run_id = "test"


def test_fixed_run_on_a_ray_started_here_decides_as_ray_without_the_coordinator(ray_session):
    assert started_here()  # the session's Ray: ray.init(address="local") in this process
    config = ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})
    policy = scaling_policy(FixedScalingPolicy(config))
    assert type(policy) is NoAutoscalerPolicy
    policy.after_controller_start(_RunContext())
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2
    assert decision.resources_per_worker == {"CPU": 0.5}
    assert policy._coordinator_client is None  # no actor was asked for, so none was started
    elastic = ElasticScalingPolicy(ScalingConfig(num_workers=(1, 2)))
    assert scaling_policy(elastic) is elastic  # it counts the workers the cluster holds through the coordinator
