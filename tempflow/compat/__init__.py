"""Drop-in replacements for the step functions of other flow-RL codebases, on tempflow's fused ops.

* :mod:`tempflow.compat.flow_grpo`: Flow-GRPO's ``sde_step_with_logprob`` (and ``patch()``);
* :mod:`tempflow.compat.tempflow_grpo`: TempFlow-GRPO's per-step ``sde_step_with_logprob`` and its training-time
  scorer (``patch_perstep()``, ``patch_scorer()``).

Each keeps the original's signature, return tuple, shapes and dtypes, and draws the same noise from the same
generator; docs/ALGORITHM.md, section 5, says what is reproduced and to which tolerance.
"""
