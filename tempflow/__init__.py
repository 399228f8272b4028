"""tempflow: TempFlow-GRPO and Flow-GRPO for flow-matching image models.

Layers (each importable on its own):
  tempflow.sde     time grids, noise schedules, SDE/ODE steps, log-prob, KL, noise-aware weights (fp32 reference)
  tempflow.rng     counter-based Philox noise: a pure function of (seed, stream ids, element)
  tempflow.ops     fast paths behind one backend choice (torch | cpu | triton)
  tempflow.compat  drop-in replacements for other codebases' functions (flow_grpo)
"""

__version__ = "0.1.0"
