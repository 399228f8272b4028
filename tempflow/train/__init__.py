"""Training: advantages (ALGORITHM.md sections 2 and 3), and the pieces the trainer loop is built from."""

from .advantages import flow_grpo_advantages, group_normalize, signal_rows, tempflow_advantages

__all__ = ["group_normalize", "tempflow_advantages", "flow_grpo_advantages", "signal_rows"]
