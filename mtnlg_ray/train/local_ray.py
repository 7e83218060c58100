"""Ray Train's fixed-size scaling policy without the autoscaling request, for a Ray this process started.

Ray Train 2.60 registers every run's worker resources with an autoscaling coordinator (Ray Data's
`_AutoscalingCoordinatorActor`, an actor process of its own started beside the controller), which
forwards them to the cluster's autoscaler so that it adds the nodes the workers need, and renews
the request every few seconds. A Ray that `ray.init()` started in this process (the `mtnlg`
commands without RAY_ADDRESS, the tests) has no autoscaler that could add a node: the request can
never act, while the actor costs a process start beside the controller's and about 140 wake-ups a
second beside the training threads (docs/benchmarks.md). For a fixed worker count there the trainer
uses `NoAutoscalerPolicy`, which decides as Ray's `FixedScalingPolicy` and sends nothing. An
elastic run keeps Ray's policy: it counts the workers the cluster can hold through the coordinator.
Kept apart from train/trainer.py because the controller unpickles it: this module imports only Ray.
"""

from __future__ import annotations

import ray
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ScalingPolicy


class NoAutoscalerPolicy(FixedScalingPolicy):
    """`FixedScalingPolicy` that never asks an autoscaler for resources (there is none to ask)."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (`ray.init()` without an address):
    a cluster with no autoscaler. A driver that joined a cluster (RAY_ADDRESS, `ray job submit`)
    may be on one that adds nodes."""
    node = ray._private.worker._global_node
    return bool(node is not None and node.head)


def scaling_policy(policy: ScalingPolicy) -> ScalingPolicy:
    """The policy a run uses: Ray's own, or for a fixed worker count on a Ray started here, the same
    decisions without the autoscaling coordinator."""
    if type(policy) is FixedScalingPolicy and started_here():
        return NoAutoscalerPolicy(policy.scaling_config)
    return policy
