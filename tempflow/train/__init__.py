"""Training: the settings (TrainConfig), advantages (docs/ALGORITHM.md sections 2 and 3), held-out evaluation and the
trainer loop built from them."""

from .advantages import flow_grpo_advantages, group_normalize, signal_rows, tempflow_advantages
from .config import SettingError, TrainConfig
from .evaluation import evaluate
from .trainer import load_run, train

__all__ = ["TrainConfig", "SettingError", "train", "load_run", "evaluate", "group_normalize", "tempflow_advantages",
           "flow_grpo_advantages", "signal_rows"]  # fmt: skip
