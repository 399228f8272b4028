"""DeepSpeed glue: one :class:`Runtime` hides whether the trainer runs alone or as one of several ZeRO-2/3 ranks.

Launch with ``deepspeed --num_gpus N -m tempflow.cli train ...`` or ``torchrun --nproc-per-node N -m tempflow.cli
train ...`` (each sets RANK / WORLD_SIZE / LOCAL_RANK); on CPU the ranks talk over gloo. What each rank does:

- prompts are sharded whole (prompt ``i`` of an iteration goes to rank ``i % world``), so seed- and prompt-group
  statistics are local; global statistics (Flow-GRPO's global std, TempFlow's global group) are computed from the
  gathered rewards, so every rank gets exactly the single-process advantages;
- the trained states of an iteration are put in one global order by a hash of (iteration, prompt, seed, step), so
  an optimizer step covers the same states whatever the number of ranks; each rank scales its share so that
  DeepSpeed's gradient average equals the single-process mean over the step's states;
- only the denoiser (``model.transformer``) is handed to DeepSpeed. Text encoders and reward models are built
  outside ``deepspeed.zero.Init`` and never passed to it, so they keep their full weights on every rank (the
  public codebases' "reward model loaded with empty weights" comes from building them inside a ZeRO-3 context);
- EMA is kept per rank on the rank's own partition of each trainable parameter (no full copy under ZeRO-3) and
  gathered only to be saved;
- the KL reference of LoRA training is the same partitioned model with its adapters disabled.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Runtime:
    """Single process (``engine`` None) or one DeepSpeed rank. The trainer calls the same methods either way."""

    def __init__(self, rank: int = 0, world: int = 1, engine=None, zero_stage: int = 0):
        self.rank, self.world, self.engine, self.zero_stage = rank, world, engine, zero_stage

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops alone) ----
    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def all_sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Sum each named value over ranks in one collective (a name missing on a rank counts 0 there)."""
        total: dict[str, float] = {}
        for part in self.all_gather({k: float(v) for k, v in values.items()}):
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop requested by one rank's callback stops all)."""
        return self.all_sum(1.0 if flag else 0.0) > 0

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (small, picklable: e.g. a tuple of CPU tensors), in rank order."""
        if self.world == 1:
            return [obj]
        parts = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's 1-D ``t`` (sizes may differ) in rank order."""
        if self.world == 1:
            return t
        return torch.cat(self.all_gather(t.cpu())).to(t.device)

    # ---- parameters ----
    def local(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The part of ``p`` this rank owns: its ZeRO-3 partition (flat), or the whole tensor."""
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

    def gather_full(self, params, locals_) -> list[torch.Tensor]:
        """Full tensors from per-rank partitions ``locals_`` of ``params`` (e.g. the EMA); identity without ZeRO-3."""
        if not any(hasattr(p, "ds_tensor") for p in params):
            return [t.detach().clone() for t in locals_]
        out = []
        for p, shard in zip(params, locals_, strict=True):
            parts = [torch.empty_like(shard) for _ in range(self.world)]
            dist.all_gather(parts, shard.contiguous())
            out.append(torch.cat(parts)[: p.ds_numel].view(p.ds_shape).clone())
        return out

    def scatter_full(self, params, full) -> list[torch.Tensor]:
        """This rank's partitions of the full tensors ``full`` (inverse of :meth:`gather_full`)."""
        out = []
        for p, f in zip(params, full, strict=True):
            if hasattr(p, "ds_tensor"):
                n = p.ds_tensor.numel()
                flat = torch.nn.functional.pad(f.flatten(), (0, n * self.world - f.numel()))
                out.append(flat[self.rank * n : (self.rank + 1) * n].clone().to(p.ds_tensor.dtype))
            else:
                out.append(f.clone().to(p.dtype))
        return out

    @contextmanager
    def gathered(self, params):
        """Within this block every rank sees the full values of ``params`` (ZeRO-3), read-only."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(params)):
                yield
        else:
            yield

    # ---- the optimizer step ----
    def backward_step(self, loss: torch.Tensor, opt, params, grad_clip: float) -> None:
        if self.engine is None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        else:
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed averages gradients over ranks, clips the global norm, steps


def deepspeed_config(zero_stage: int, grad_clip: float, precision: str) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: needs no compiled DeepSpeed op
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        # every rank reaches teardown before any closes its connections (a rank whose peer is already gone can
        # abort in gloo's threads); bounded, so a rank left alone by a failed peer still exits
        try:
            if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except Exception:  # noqa: BLE001 - a peer that failed: tear down anyway
            pass
        dist.destroy_process_group()


def start(model, params, make_optimizer, zero_stage: int, grad_clip: float, precision: str = "fp32"):
    """The run's :class:`Runtime` and optimizer. ``zero_stage`` 0 runs alone (an error if launched on several
    processes); 2 or 3 hands ``model.transformer`` and the trainable ``params`` to DeepSpeed."""
    world = launched_world_size()
    if zero_stage == 0:
        if world > 1:
            raise RuntimeError(f"launched on {world} processes but zero_stage=0: set zero_stage=2 or 3")
        return Runtime(), make_optimizer(params)
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 0, 2 or 3, got {zero_stage}")
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("zero_stage 2/3 needs DeepSpeed: pip install deepspeed (or tempflow[deepspeed])") from exc
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce op (~50 s) used only by inference;
        # training collectives go through gloo, so skip the build. The module must come from sys.modules:
        # ``import deepspeed.comm.torch as ds_torch`` binds ``deepspeed.comm.torch`` the attribute, which
        # ``from .comm import *`` in deepspeed/comm/__init__.py has made the torch package itself, so the patch
        # would land on torch and TorchBackend would still build the op.
        ds_torch = importlib.import_module("deepspeed.comm.torch")
        ds_torch.build_shm_op = lambda: None
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    # Destroy the process group while the interpreter is still whole: left to interpreter shutdown, gloo's worker
    # threads can abort the process ("terminate called without an active exception", pytorch/pytorch#190489).
    atexit.register(_destroy_process_group)
    if not on_cpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    engine, opt, _, _ = deepspeed.initialize(
        model=model.transformer,
        model_parameters=params,
        optimizer=make_optimizer(params),
        config=deepspeed_config(zero_stage, grad_clip, precision),
    )
    return Runtime(dist.get_rank(), dist.get_world_size(), engine, zero_stage), opt
