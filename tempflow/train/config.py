"""TrainConfig: every setting of a run, with a help string each, converted and checked completely when it is made
(from Python, a YAML file or ``--set name=value``), before any model is loaded.

Its defaults are the embedded default's recipe (the digits model, its prompts and its reward); configs/ holds the
settings of real runs (SD3.5-M + PickScore, + GenEval over a reward server, FLUX.1-dev + HPS).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields

from .. import sde

__all__ = ["TrainConfig", "SettingError"]

BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


class SettingError(ValueError):
    """A setting that cannot be used: the message names the setting, the value and what is allowed."""


def _bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOLS:
        return BOOLS[value.strip().lower()]
    raise ValueError("expected true/false (also 1/0, yes/no, on/off)")


def _int(value):
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
    raise ValueError("expected an integer")


def _float(value):
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        out = float(value.strip() if isinstance(value, str) else value)  # YAML reads 1e-4 as a string: converted here
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(out):
        raise ValueError("expected a finite number")
    return out


def _str(value):
    if value is None:
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError("expected a string")


def _compile(value):
    """The ``compile`` setting as "false", "true" or "static" (booleans and yes/no, on/off, 1/0 too)."""
    if isinstance(value, str) and value.strip().lower() in ("static", "dynamic"):
        return "static" if value.strip().lower() == "static" else "true"
    try:
        return "true" if _bool(value) else "false"
    except ValueError:
        raise ValueError("expected false, true or static") from None


def _completion(value):
    """The ``completion`` setting in its canonical text (``euler``, ``euler:2``, ``heun:2``, ``euler:3,2,1``)."""
    from ..rollout.plan import Completion

    if isinstance(value, int) and not isinstance(value, bool):
        value = f"euler:{value}"
    elif isinstance(value, (list, tuple)):
        value = "euler:" + ",".join(str(v) for v in value)
    return str(Completion.parse(value))


def _optional_float(value):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return _float(value)


def _steps(value):
    """A list of step indices: a YAML list, or "0,1,2" / "[0, 1, 2]" from the command line; empty: none given."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [v for v in value.strip().strip("[]").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of step indices, e.g. [0, 1, 2]")
    return [_int(v) for v in value]


def _reward(value):
    """A reward name / import path, or a mapping name -> weight | {weight, keyword arguments}."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Mapping):
        return {str(k): (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()}
    raise ValueError("expected a reward name, module:function, or a mapping name -> weight")


def _mapping(value):
    """Keyword arguments: a mapping of names (YAML, or ``{num_frames: 33}`` from the command line); empty: none."""
    if value is None or value == "":
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise ValueError("expected a mapping of option names to values, e.g. {num_frames: 33}")
    reserved = sorted(set(value) & {"device", "dtype", "torch_dtype", "height", "width", "attention",
                                    "max_sequence_length"})  # fmt: skip
    if reserved:
        raise ValueError(f"{', '.join(reserved)} are settings of their own: set them directly, not in model_args")
    return dict(value)


def _f(default, help: str, kind: Callable | None = None):
    """A setting: its default, help string and converter (from the default's type unless given)."""
    kind = kind or {bool: _bool, int: _int, float: _float, str: _str}[type(default)]
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "kind": kind})
    return field(default=default, metadata={"help": help, "kind": kind})


@dataclass
class TrainConfig:
    """Every knob of a run; printed at start and saved with the run (config.json). Made from keyword arguments,
    :meth:`from_dict` (YAML) or :meth:`from_sources` (``--config`` + ``--set``); invalid settings raise
    :class:`SettingError` at once."""

    # --- model -------------------------------------------------------------------------------------------------
    model: str = _f("digits", "'digits' (the embedded default) or a local diffusers folder (SD3/SD3.5, FLUX.1, "
                    "Qwen-Image, Wan 2.1 T2V, Z-Image, FLUX.2-dev)")  # fmt: skip
    resolution: int = _f(0, "square image size in pixels; 0: the model's own (digits 16, SD3/FLUX pipelines' default)")
    height: int = _f(0, "image height (overrides resolution; 0: resolution)")
    width: int = _f(0, "image width (overrides resolution; 0: resolution)")
    dtype: str = _f("fp32", "weights of the denoiser and text encoders: fp32 | bf16 | fp16 (LoRA weights and all loss "
                    "maths stay fp32; the VAE decodes in fp32)")  # fmt: skip
    attention: str = _f("sdpa", "attention kernels of the transformer: sdpa | xformers | flash")
    max_sequence_length: int = _f(0, "text tokens: T5's (SD3, FLUX), the most kept (Qwen-Image, Z-Image), the padded "
                                  "length (Wan's UMT5, FLUX.2's Mistral); 0: the model's own, 128 as Flow-GRPO and "
                                  "TempFlow-GRPO for SD3, FLUX and Qwen-Image, 512 (the pipelines') for Wan, Z-Image "
                                  "and FLUX.2")  # fmt: skip
    device: str = _f("auto", "auto (this rank's GPU if there is one, else cpu) | cpu | cuda | cuda:N")
    model_args: dict = _f({}, "the model family's own loading options, e.g. Wan: {num_frames: 33, negative_prompt: "
                          "'...', flow_shift: 3.0}", _mapping)  # fmt: skip
    # --- prompts and rewards -----------------------------------------------------------------------------------
    prompts: str = _f("digits", "training prompts: 'digits', a .txt file (one a line) or a .jsonl file (one object a "
                      "line with 'prompt' and metadata handed to the rewards)")  # fmt: skip
    eval_prompts: str = _f("digits", "held-out prompts, the same forms; '' for no evaluation")
    reward: str | dict = _f("digit-correctness", "a reward name, module:function, module:Class, or a mapping name -> "
                            "weight | {weight, arguments} (a part with a url is scored by a reward server)",
                            _reward)  # fmt: skip
    eval_reward: str | dict = _f("", "the held-out reward, the same forms; '': the training reward", _reward)
    # --- the algorithm -----------------------------------------------------------------------------------------
    method: str = _f("tempflow", "tempflow (branching, process rewards) or flow-grpo (SDE trajectories)")
    steps: int = _f(10, "sampling steps T")
    branches: int = _f(6, "K branches per branch step (tempflow)")
    skip_spread: float = _f(0.0, "adaptive branch steps (tempflow): skip a branch step whose within-group reward "
                            "spread stayed below this fraction of the widest step's over its last skip_window "
                            "iterations; 0: every step, always", _float)  # fmt: skip
    skip_window: int = _f(3, "adaptive branch steps: the observations a step must stay quiet for")
    skip_probe: int = _f(10, "adaptive branch steps: every skip_probe-th iteration runs every step (re-measures)")
    completion: str = _f("euler", "how tempflow completes its branches: euler (every remaining step, the paper's) | "
                         "euler:M (at most M steps on a sub-grid) | heun:M | dpm2m:M (second order) | one M per branch "
                         "step (euler:3,2,2,1, the last repeating) | x0 (the one-step prediction x - t v)",
                         _completion)  # fmt: skip
    seeds_per_prompt: int = _f(4, "N seeds per prompt (tempflow) or G trajectories per prompt (flow-grpo)")
    prompts_per_iteration: int = _f(2, "prompts rolled out per iteration (over all ranks)")
    iterations: int = _f(60, "training iterations (rollout + update)")
    train_steps: list = _f([], "the trained (branched / stochastic) steps, e.g. [0, 1, 2]; empty: timestep_fraction",
                           _steps)  # fmt: skip
    timestep_fraction: float = _f(1.0, "without train_steps: the first int(T * fraction) steps are trained, at most "
                                  "T-1 (Flow-GRPO's setting)")  # fmt: skip
    group: str = _f(
        "seed",
        "advantage group of tempflow: seed | prompt | global; of flow-grpo: prompt (per-prompt std), otherwise the "
        "global std",
    )
    weighting: bool = _f(True, "noise-aware weighting of the policy term (tempflow)")
    noise_level: float = _f(0.7, "SDE noise level a (0.7 for SD3.5-M, 0.9 for FLUX in the papers)")
    schedule: str = _f("flow-grpo", "SDE noise schedule: flow-grpo | cps | dance (docs/ALGORITHM.md section 1)")
    guidance: float = _f(2.0, "classifier-free guidance in sampling and training (FLUX.1-dev: its guidance embedding)")
    clip_eps: float = _f(1e-3, "PPO clip range of the ratio (log-probs are averaged, so it is small)")
    adv_clip: float = _f(5.0, "advantages are clipped to [-adv_clip, adv_clip]")
    beta: float = _f(0.0, "weight of the exact KL to the LoRA-disabled base model")
    # --- optimisation ------------------------------------------------------------------------------------------
    lr: float = _f(3e-4, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lora_rank: int = _f(16, "LoRA rank (0: full fine-tuning)")
    lora_alpha: int = _f(32, "LoRA alpha")
    grad_clip: float = _f(1.0, "gradient norm clip")
    states_per_step: int = _f(
        6,
        "trained (seed, step) states per optimizer step (6: 12 updates per default iteration; 36, 2 updates, learned "
        "slower in bench/bench_train.py)",
    )
    ema: float = _f(0.9, "EMA decay of the trainable weights (0 disables)")
    grad_checkpointing: bool = _f(False, "recompute the transformer's activations in backward (less memory)")
    zero_stage: int = _f(-1, "DeepSpeed ZeRO stage 2 or 3; 0: none (one process); -1: 3 when launched on several")
    max_batch: int = _f(64, "most rows one transformer forward sees in rollout and evaluation; a classifier-free "
                            "guidance pair counts two (64 = 32 CFG pairs, the previous default; the official code's "
                            "largest forward is 48)")  # fmt: skip
    compile: str = _f("false", "torch.compile the denoiser's forward for rollouts and evaluation: false | true (one "
                      "graph, dynamic batch size) | static (a graph per chunk size, chunks padded to powers of two); "
                      "the training forward stays eager", _compile)  # fmt: skip
    seed: int = _f(0, "run seed (noise streams, prompt order)")
    # --- evaluation --------------------------------------------------------------------------------------------
    eval_every: int = _f(0, "iterations between held-out evaluations (0: only before training and at the end)")
    eval_steps: int = _f(40, "ODE steps of the held-out samples (deterministic)")
    eval_guidance: float | None = _f(None, "guidance of the held-out samples (null: the training guidance)",
                                     _optional_float)  # fmt: skip
    eval_per_prompt: int = _f(50, "held-out samples per prompt")
    eval_seed: int = _f(1, "noise seed of the held-out samples (the same for every run, so runs compare)")
    # --- output ------------------------------------------------------------------------------------------------
    out: str = _f("runs/digits", "output folder: config, metrics.jsonl, checkpoint.pt, sample grids")
    checkpoint_every: int = _f(10, "iterations between checkpoints and reward-curve PNGs")
    checkpoint_minutes: float = _f(
        10.0,
        "also checkpoint after the first iteration that ends this many minutes after the last checkpoint, so a kill "
        "loses at most that (0: only checkpoint_every)",
    )
    tensorboard: bool = _f(False, "also log metrics to TensorBoard (<out>/tensorboard; needs tensorboard)")
    wandb: str = _f("", "also log metrics to this Weights & Biases project (needs wandb)")

    def __post_init__(self):
        for f in fields(self):
            try:
                setattr(self, f.name, f.metadata["kind"](getattr(self, f.name)))
            except (TypeError, ValueError) as exc:
                raise SettingError(f"setting {f.name}={getattr(self, f.name)!r}: {exc}") from None
        self.validate()

    # ---- checks -----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Ranges of every setting and the combinations that cannot train; each error names the setting."""
        choices = {
            "method": ("tempflow", "flow-grpo"),
            "group": ("seed", "prompt", "global"),
            "schedule": sde.SCHEDULES,
            "dtype": ("fp32", "bf16", "fp16"),
            "attention": ("sdpa", "xformers", "flash"),
            "zero_stage": (-1, 0, 2, 3),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SettingError(f"setting {name}={getattr(self, name)!r}: choose one of "
                                   f"{', '.join(map(str, allowed))}")  # fmt: skip
        at_least = {"steps": 1, "branches": 1, "seeds_per_prompt": 1, "prompts_per_iteration": 1, "iterations": 1,
                    "states_per_step": 1, "max_batch": 2, "checkpoint_every": 1, "eval_steps": 1,
                    "eval_per_prompt": 1, "max_sequence_length": 0, "eval_every": 0,
                    "skip_window": 1, "skip_probe": 0, "resolution": 0, "height": 0,
                    "width": 0, "lora_rank": 0, "seed": 0, "eval_seed": 0}  # fmt: skip
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise SettingError(f"setting {name}={getattr(self, name)}: must be >= {low}")
        positive = ("noise_level", "guidance", "clip_eps", "adv_clip", "lr", "grad_clip", "lora_alpha")
        for name in positive:
            if not getattr(self, name) > 0:
                raise SettingError(f"setting {name}={getattr(self, name)}: must be > 0")
        for name in ("beta", "weight_decay", "checkpoint_minutes", "skip_spread"):
            if getattr(self, name) < 0:
                raise SettingError(f"setting {name}={getattr(self, name)}: must be >= 0")
        if not 0 <= self.ema < 1:
            raise SettingError(f"setting ema={self.ema}: must be in [0, 1) (0 disables the EMA)")
        if self.eval_guidance is not None and not self.eval_guidance > 0:
            raise SettingError(f"setting eval_guidance={self.eval_guidance}: must be > 0 (or null: the training one)")
        if not 0 < self.timestep_fraction <= 1:
            raise SettingError(f"setting timestep_fraction={self.timestep_fraction}: must be in (0, 1]")
        if self.schedule == "cps" and self.noise_level > 1:
            raise SettingError(f"setting noise_level={self.noise_level}: cps needs a noise level in (0, 1]")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise SettingError(f"setting device={self.device!r}: choose auto, cpu, cuda or cuda:N")
        if not self.out.strip():
            raise SettingError("setting out='': give an output folder for the run")
        if not self.prompts.strip():
            raise SettingError("setting prompts='': give 'digits' or a .txt / .jsonl prompt file")
        from ..rewards.registry import reward_parts

        for name in ("reward", "eval_reward"):
            if name == "eval_reward" and self.eval_reward == "":
                continue
            try:
                reward_parts(getattr(self, name))
            except ValueError as exc:
                raise SettingError(f"setting {name}: {exc}") from None
        steps = self.trained_steps()
        bad = [k for k in steps if not 0 <= k < self.steps]
        if bad or len(set(self.train_steps)) != len(self.train_steps):
            raise SettingError(f"setting train_steps={self.train_steps}: steps must be distinct and in 0 .. "
                               f"{self.steps - 1} (T = {self.steps})")  # fmt: skip
        if not steps:
            raise SettingError(f"no step to train: steps={self.steps} with timestep_fraction={self.timestep_fraction} "
                               "trains none; use steps >= 2 or list train_steps")  # fmt: skip
        if self.schedule == "cps" and self.steps - 1 in steps:
            raise SettingError(f"setting train_steps: cps has no noise at the last step ({self.steps - 1}); leave it "
                               "out")  # fmt: skip
        if self.method != "tempflow" and self.skip_spread > 0:
            raise SettingError(f"setting skip_spread={self.skip_spread}: adaptive branch steps are tempflow's; "
                               "flow-grpo has no branch groups to measure (leave it at 0)")  # fmt: skip
        if self.skip_spread >= 1:
            raise SettingError(f"setting skip_spread={self.skip_spread}: a fraction of the widest step's spread in "
                               "[0, 1) (the widest step would skip itself)")  # fmt: skip
        if self.method != "tempflow" and self.completion != "euler":
            raise SettingError(f"setting completion={self.completion}: only tempflow completes branches; flow-grpo's "
                               "trajectories have none (leave completion at euler)")  # fmt: skip
        self._check_signal()

    def _check_signal(self) -> None:
        """Refuse settings whose advantages are all zero by construction (they would train nothing, silently)."""
        why = None
        if self.method == "flow-grpo" and self.seeds_per_prompt < 2:
            why = ("flow-grpo with seeds_per_prompt=1: each advantage is a reward minus the mean of its own prompt's "
                   "group, which is itself; use seeds_per_prompt >= 2 (Flow-GRPO: 24)")  # fmt: skip
        elif self.method == "tempflow" and self.group == "seed" and self.branches < 2:
            why = ("tempflow with branches=1 and group=seed: a seed group holds one branch, so every advantage is 0; "
                   "use branches >= 2 (the paper: 6) or group=prompt")  # fmt: skip
        elif self.method == "tempflow" and self.group == "prompt" and self.branches * self.seeds_per_prompt < 2:
            why = "tempflow with group=prompt needs branches x seeds_per_prompt >= 2 rows per prompt and step"
        elif (
            self.method == "tempflow"
            and self.group == "global"
            and (self.branches * self.seeds_per_prompt * self.prompts_per_iteration < 2)
        ):
            why = "tempflow with group=global needs at least 2 rows per step in an iteration"
        if why:
            raise SettingError(f"no learning signal: {why}")

    # ---- derived ----------------------------------------------------------------------------------------------
    def trained_steps(self) -> tuple[int, ...]:
        """The branched (tempflow) or stochastic and trained (flow-grpo) steps."""
        if self.train_steps:
            return tuple(sorted(self.train_steps))
        return tuple(range(min(int(self.steps * self.timestep_fraction + 1e-9), self.steps - 1)))

    def plan(self):
        from ..rollout import BranchPlan

        if self.method == "tempflow":
            return BranchPlan.tempflow(self.steps, self.branches, self.trained_steps(), self.completion)
        return BranchPlan.flow_grpo(self.steps, self.trained_steps())

    def rollout_config(self, backend: str | None = None):
        """The engine's settings of this run (the one place TrainConfig becomes a RolloutConfig)."""
        from ..rollout import RolloutConfig

        return RolloutConfig(plan=self.plan(), seeds_per_prompt=self.seeds_per_prompt, guidance=self.guidance,
                             noise_level=self.noise_level, schedule=self.schedule, seed=self.seed,
                             max_batch=self.max_batch, backend=backend,
                             compile={"false": False, "true": True, "static": "static"}[self.compile])  # fmt: skip

    def resolved_zero_stage(self) -> int:
        from . import distributed

        if self.zero_stage == -1:
            return 3 if distributed.launched_world_size() > 1 else 0
        return self.zero_stage

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"

    def model_options(self) -> dict:
        """What :func:`tempflow.models.load_model` takes besides the model."""
        return dict(device=self.resolved_device(), dtype=self.dtype, height=self.height or self.resolution or None,
                    width=self.width or self.resolution or None, attention=self.attention,
                    max_sequence_length=self.max_sequence_length or None, **self.model_args)  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping, source: str = "settings") -> TrainConfig:
        """From a mapping (a YAML file's): unknown names are refused with the closest known ones."""
        if not isinstance(values, Mapping):
            raise SettingError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise SettingError(f"{source}: unknown setting {key!r}{hint}; see tempflow train --help-config")
        return cls(**values)

    @classmethod
    def from_sources(cls, config: str | None = None, sets=(), base: Mapping | None = None) -> TrainConfig:
        """``base`` values, then a YAML file, then ``name=value`` overrides (values of mappings and lists are YAML)."""
        values = dict(base or {})
        if config:
            import yaml

            if not os.path.isfile(config):
                raise SettingError(f"config file {config!r} not found")
            try:
                with open(config) as fh:
                    loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise SettingError(f"config file {config!r} is not valid YAML: {exc}") from None
            if loaded is not None and not isinstance(loaded, Mapping):
                raise SettingError(f"config file {config!r}: expected a mapping of settings")
            values.update(loaded or {})
        for item in sets or ():
            name, sep, raw = item.partition("=")
            name = name.strip()
            if not sep or not name:
                raise SettingError(f"--set {item!r}: write name=value")
            values[name] = _parse_value(cls, name, raw)
        return cls.from_dict(values, source=config or "--set")

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"  {f.name} = {_default(f)!r}: {f.metadata['help']}" for f in fields(cls))


def _default(f):
    return f.default_factory() if callable(f.default_factory) else f.default


def _parse_value(cls, name: str, raw: str):
    """A ``--set`` value: mappings and lists (reward, train_steps) are YAML; everything else stays a string for the
    setting's own converter."""
    kinds = {f.name: f.metadata["kind"] for f in fields(cls)}
    if kinds.get(name) in (_reward, _steps, _mapping) and raw.strip()[:1] in ("{", "["):
        import yaml

        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise SettingError(f"--set {name}={raw!r}: not valid YAML: {exc}") from None
    return raw
