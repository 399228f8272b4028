"""tempflow: TempFlow-GRPO and Flow-GRPO for flow-matching image models.

Layers (each importable on its own):
  tempflow.sde        time grids, noise schedules, SDE/ODE steps, log-prob, KL, noise-aware weights (fp32 reference)
  tempflow.rng        counter-based Philox noise: a pure function of (seed, stream ids, element)
  tempflow.ops        fused ops behind one backend choice (torch | cpu | triton | cuda)
  tempflow.models     the adapter protocol; SD3 / FLUX adapters; the embedded digits model
  tempflow.rewards    the reward protocol and built-in rewards
  tempflow.rollout    branch plans, the batched tree-rollout engine, the naive reference loop
  tempflow.train      advantages and the trainer loop
  tempflow.compat     drop-in step functions of Flow-GRPO (flow_grpo) and TempFlow-GRPO (tempflow_grpo)
"""

__version__ = "0.1.0"
