"""Rewards by name: what the ``reward`` setting of ``tempflow train`` (YAML or ``--set``) and ``tempflow
serve-reward`` build from.

A reward setting is one of:

* a registered name: ``digit-correctness``, ``jpeg-compressibility``, ``pickscore``, ``aesthetic``, ``hpsv2``, and
  for videos ``frames`` (an image reward's mean over frames: ``{frames: {reward: pickscore, frames: all}}``) and
  ``temporal-consistency`` (:data:`REWARDS`; register more with :func:`register_reward`);
* an import path of the user's own code: ``module:function`` (a callable ``(images, prompts, metadata) -> (B,)``)
  or ``module:Class`` (instantiated with the keyword arguments);
* a mapping of several, weighted: ``{name: weight}`` or ``{name: {weight: w, <keyword arguments>}}``, e.g.
  ``{pickscore: {weight: 1.0, path: /models/pickscore}, jpeg-compressibility: 0.1}``. A part whose arguments hold a
  ``url`` is scored by a reward server (:class:`tempflow.rewards.remote.RemoteReward`), e.g.
  ``{geneval: {url: http://127.0.0.1:18085, weight: 1.0}}``; the key names it in the metrics.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping

from .base import FunctionReward, Reward, WeightedSum

__all__ = ["REWARDS", "register_reward", "build_reward", "load_object", "reward_parts"]

REWARDS: dict[str, str | Callable[..., Reward]] = {
    "digit-correctness": "tempflow.rewards.digits:DigitCorrectness",
    "jpeg-compressibility": "tempflow.rewards.jpeg:JpegCompressibility",
    "pickscore": "tempflow.rewards.clip:PickScore",
    "aesthetic": "tempflow.rewards.clip:Aesthetic",
    "hpsv2": "tempflow.rewards.clip:HPSv2",
    "frames": "tempflow.rewards.video:frames_reward",
    "temporal-consistency": "tempflow.rewards.video:TemporalConsistency",
}


def register_reward(name: str, factory: str | Callable[..., Reward] | None = None):
    """Register ``factory(device=..., **kwargs) -> reward`` (or its ``module:attribute`` path, imported when first
    used) under ``name``; usable as a decorator. The run's device is passed unless the setting gives one."""
    if factory is None:
        return lambda f: register_reward(name, f)
    REWARDS[name] = factory
    return factory


def load_object(path: str):
    """``"package.module:attribute"`` -> the attribute (the module imported normally, so it must be importable
    from the current directory or the Python path)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path: write module:function or module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for reward {path!r}: {exc} (is it on PYTHONPATH?)") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no {attr!r} (reward {path!r})")
        obj = getattr(obj, part)
    return obj


def _one(name: str, kwargs: dict, device) -> Reward:
    """One reward from its name (registered, import path, or remote with a ``url``) and keyword arguments."""
    kwargs = dict(kwargs)
    if "url" in kwargs:
        from .remote import RemoteReward

        return RemoteReward(name=name, **kwargs)
    if name in REWARDS:
        factory = REWARDS[name]
        factory = load_object(factory) if isinstance(factory, str) else factory
        if device is not None:
            kwargs.setdefault("device", device)
        return _build(factory, kwargs, name)
    if ":" in name:
        obj = load_object(name)
        if inspect.isclass(obj):
            made = _build(obj, kwargs, name)
            if isinstance(made, Reward):
                return made
            return FunctionReward(made, name)
        if not callable(obj):
            raise ValueError(f"reward {name!r} is a {type(obj).__name__}, not a function or class")
        return FunctionReward(functools.partial(obj, **kwargs) if kwargs else obj, name)
    raise AssertionError(f"reward_parts lets only known names through, not {name!r}")


def _build(factory, kwargs: dict, name: str):
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"reward {name!r}: {exc}") from exc
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    return factory(**kwargs)


def reward_parts(spec) -> list[tuple[str, float, dict]]:
    """The setting as ``[(name, weight, keyword arguments)]``, checked (forms, weights, known names), without
    building anything."""
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("reward is empty: give a reward name, module:function, or a mapping name -> weight")
        spec = {spec.strip(): 1.0}
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"reward must be a name or a non-empty mapping name -> weight, got {spec!r}")
    parts = []
    for name, value in spec.items():
        if isinstance(value, Mapping):
            kwargs = dict(value)
            weight = kwargs.pop("weight", 1.0)
        else:
            weight, kwargs = value, {}
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"reward {name!r}: weight must be a number, got {weight!r}")
        parts.append((str(name), float(weight), kwargs))
    for name, _, kwargs in parts:
        if name not in REWARDS and ":" not in name and "url" not in kwargs:
            raise ValueError(f"unknown reward {name!r}: choose one of {', '.join(sorted(REWARDS))}, a module:function "
                             "or module:Class import path, or give a url (a reward server)")  # fmt: skip
    return parts


def build_reward(spec, device=None) -> Reward:
    """The reward a setting describes (see the module docstring); several parts make a :class:`WeightedSum`."""
    if callable(spec) and not isinstance(spec, str):
        return spec if isinstance(spec, Reward) else FunctionReward(spec)
    parts = reward_parts(spec)
    if len(parts) == 1 and parts[0][1] == 1.0:
        name, _, kwargs = parts[0]
        return _one(name, kwargs, device)
    return WeightedSum([(_one(name, kwargs, device), weight) for name, weight, kwargs in parts])
