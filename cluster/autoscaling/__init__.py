"""Autoscaling on latency: the policy (a pure decision plus Serve's adapter), its latency
window, and a small simulation to compare policies. ``cluster.autoscaling:LatencyAutoscalingPolicy``
is the import path Serve configs name."""

from cluster.autoscaling.policy import LatencyAutoscalingPolicy

__all__ = ["LatencyAutoscalingPolicy"]
