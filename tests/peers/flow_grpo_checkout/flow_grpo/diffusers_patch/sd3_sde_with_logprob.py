# Flow-GRPO's flow_grpo/diffusers_patch/sd3_sde_with_logprob.py in this test checkout: the project's one transcription
# of the original step (tempflow/compat/flow_grpo_eager.py: its signature, expressions, order and dtypes), under the
# original's module and function name, so that the checkout's pipeline imports it as Flow-GRPO's own does.
from tempflow.compat.flow_grpo_eager import eager_sde_step_with_logprob as sde_step_with_logprob

__all__ = ["sde_step_with_logprob"]
