"""The run folder (``out``): one run at a time, a resume that cannot change the experiment, checkpoints that survive
a damaged file.

- **lock**: ``<out>/.lock`` is held (``flock``) by the process that trains into the folder; a second process fails at
  once with the holder's pid, host, start time and command. The kernel drops the lock when its holder dies, so a
  stale lock is taken over; where the file system has no ``flock`` the holder's pid is checked instead.
- **fresh or resumed**: a fresh run into a folder that holds a run is refused unless ``overwrite`` (which removes
  the run's own files, nothing else); ``resume=True`` with no checkpoint is refused; ``resume="auto"`` continues when
  there is a checkpoint and starts fresh when there is none (a job script restarted after preemption).
- **config**: ``config.json`` keeps the settings the run started with. On resume every setting is compared with it:
  those that change the experiment are refused with the differences shown; the harmless ones (:data:`HARMLESS`)
  are taken and appended to ``config_history.jsonl``. :func:`effective_config` is the original plus that history.
- **checkpoints**: ``checkpoint.pt`` is written beside, read back, then put in place, and the one it replaces is
  kept as ``checkpoint.prev.pt``; a damaged ``checkpoint.pt`` (truncated, empty, not a checkpoint) is set aside as
  ``checkpoint.pt.damaged`` and the previous one is used, with a line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time

import torch

from .._io import synced_torch_save
from .config import SettingError, TrainConfig

__all__ = ["RunFolder", "RunFolderError", "CheckpointError", "effective_config", "read_checkpoint", "HARMLESS"]

CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"
# settings a resumed run may change: they do not change what is trained or how it is measured
HARMLESS = ("iterations", "checkpoint_every", "checkpoint_minutes", "eval_every", "tensorboard", "wandb", "out",
            "device", "max_batch", "compile", "attention", "grad_checkpointing")  # fmt: skip
# what a run writes (removed by overwrite; nothing else in the folder is touched)
RUN_FILES = ("config.json", "config_history.jsonl", "metrics.jsonl", CHECKPOINT, PREVIOUS, CHECKPOINT + ".tmp",
             CHECKPOINT + ".damaged", PREVIOUS + ".damaged", "summary.json", "reward_curve.png", "eval.json",
             "samples", "deepspeed", "tensorboard")  # fmt: skip
STATE_KEYS = ("params", "ema", "iteration", "config")


class RunFolderError(RuntimeError):
    """The folder cannot be used as asked (locked, holds another run, nothing to resume, incompatible settings)."""


class CheckpointError(RuntimeError):
    """No readable checkpoint: names every file tried and why it failed."""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _check_state(state, path: str) -> dict:
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise ValueError(f"not a tempflow checkpoint (expected the keys {', '.join(STATE_KEYS)})")
    tag = state.get("deepspeed_tag")
    if tag and not os.path.isdir(os.path.join(os.path.dirname(path), "deepspeed", tag)):
        raise ValueError(f"its DeepSpeed partitions deepspeed/{tag} are missing")
    return state


def _load(path: str, mmap: bool = False) -> dict:
    """``path`` loaded and checked; ``mmap``: only the structure is read (tensor data stays on disk)."""
    if os.path.getsize(path) == 0:
        raise ValueError("the file is empty")
    state = torch.load(path, weights_only=False, map_location="cpu", mmap=mmap)
    return _check_state(state, path)


def read_checkpoint(folder: str, log=print, mmap: bool = False) -> tuple[dict, str]:
    """The newest readable checkpoint of a run folder and its path: ``checkpoint.pt``, else ``checkpoint.prev.pt``
    (saying why in ``log``). Raises FileNotFoundError when there is none and :class:`CheckpointError` when every one
    is damaged."""
    tried = []
    for name in (CHECKPOINT, PREVIOUS):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            state = _load(path, mmap)
        except Exception as exc:  # noqa: BLE001 - any failure to read means: damaged, try the previous one
            tried.append(f"{path} is damaged ({_describe(exc)})")
            continue
        if tried:
            log(f"warning: {tried[0]}; using the previous checkpoint {path} (iteration {state['iteration']})")
        return state, path
    if not tried:
        raise FileNotFoundError(f"no checkpoint in {folder!r}: train first (tempflow train --set out={folder})")
    raise CheckpointError("; ".join(tried) + f"; no readable checkpoint is left: start the run again with tempflow "
                          f"train --overwrite --set out={folder} (and its other settings)")  # fmt: skip


def effective_config(folder: str) -> dict:
    """The settings of a run: its config.json with the changes of later resumes (config_history.jsonl) applied."""
    path = os.path.join(folder, "config.json")
    with open(path) as fh:
        values = json.load(fh)
    history = os.path.join(folder, "config_history.jsonl")
    if os.path.exists(history):
        for line in open(history):
            if line.strip():
                values.update({k: new for k, (_old, new) in json.loads(line)["changes"].items()})
    return values


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """``<out>`` of one run. :meth:`open` locks it (main process only) and decides how the run starts."""

    def __init__(self, out: str, main: bool = True):
        self.out, self.main = out, main
        self.lock_path = os.path.join(out, ".lock")
        self._fh = None
        self.opened, self.resume_from = False, None

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    # ---- the lock -----------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold ``<out>/.lock`` until :meth:`release` or the process ends; fail at once when another process holds
        it."""
        if self._fh is not None or not self.main:
            return
        os.makedirs(self.out, exist_ok=True)
        fh = open(self.lock_path, "a+")
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunFolderError(
                f"{self.out!r} is in use by another tempflow process ({self._holder()}): wait for it to finish, stop "
                "it, or train into another folder (--set out=...)"
            ) from None
        except (ImportError, OSError):  # no flock here (some network file systems): trust a live pid instead
            holder = self._holder_info()
            if holder and holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid():
                if _alive(int(holder.get("pid", 0))):
                    fh.close()
                    raise RunFolderError(f"{self.out!r} is in use by another tempflow process ({self._holder()}): "
                                         "wait for it to finish or train into another folder") from None  # fmt: skip
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300]}  # fmt: skip
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(info) + "\n")
        fh.flush()
        self._fh = fh

    def _holder_info(self) -> dict:
        try:
            with open(self.lock_path) as fh:
                return json.loads(fh.read() or "{}")
        except (OSError, ValueError):
            return {}

    def _holder(self) -> str:
        h = self._holder_info()
        if not h:
            return "holder unknown"
        return f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}: {h.get('command')}"

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock; the file stays (its content is stale)
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    # ---- starting ---------------------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """Something computed: metrics or a checkpoint (a config.json alone is a run that failed to start)."""
        return any(os.path.exists(self.path(n)) for n in ("metrics.jsonl", CHECKPOINT, PREVIOUS))

    def has_checkpoint(self) -> bool:
        return any(os.path.exists(self.path(n)) for n in (CHECKPOINT, PREVIOUS))

    def open(self, cfg: TrainConfig, resume: bool | str = False, overwrite: bool = False, log=print) -> str | None:
        """Lock the folder and prepare it; returns the checkpoint to resume from (None: a fresh run).

        ``resume``: False (fresh: refused when the folder holds a run, unless ``overwrite``), True (continue from
        the checkpoint: refused when there is none or the settings change the experiment) or ``"auto"`` (continue
        when there is a checkpoint, else start fresh)."""
        if resume not in (False, True, "auto"):
            raise ValueError(f"resume={resume!r}: choose False, True or 'auto'")
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite contradict each other: choose one")
        if self.opened:
            return self.resume_from
        self.lock()
        self.resume_from = self._start(cfg, resume, overwrite, log)
        self.opened = True
        return self.resume_from

    def _start(self, cfg, resume, overwrite, log) -> str | None:
        if resume == "auto":
            resume = self.has_checkpoint()
            if not resume and os.path.exists(self.path("config.json")):
                self._compare(cfg)  # a different experiment must not replace this one silently
                overwrite = True
        if resume:
            return self._resume(cfg, log)
        if self.holds_run():
            if not overwrite:
                raise RunFolderError(f"{self.out!r} already holds a run ({self._summary()}): continue it with "
                                     "--resume, replace it with --overwrite, or train into another folder "
                                     "(--set out=...)")  # fmt: skip
            self._clear()
            log(f"--overwrite: removed the earlier run in {self.out}")
        with open(self.path("config.json") + ".tmp", "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=2)
        os.replace(self.path("config.json") + ".tmp", self.path("config.json"))
        return None

    def _summary(self) -> str:
        try:
            return f"checkpoint at iteration {read_checkpoint(self.out, log=_quiet, mmap=True)[0]['iteration']}"
        except Exception:  # noqa: BLE001 - only a description
            return "no readable checkpoint" if self.has_checkpoint() else "no checkpoint yet"

    def _clear(self) -> None:
        for name in RUN_FILES:
            path = self.path(name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def _resume(self, cfg: TrainConfig, log) -> str:
        if not self.has_checkpoint():
            why = "it was stopped before its first checkpoint" if self.holds_run() else "it holds no run"
            raise RunFolderError(f"nothing to resume in {self.out!r}: no checkpoint ({why}); start it with "
                                 "--overwrite (or without --resume), or use --resume auto to start fresh when there "
                                 "is nothing to resume")  # fmt: skip
        state, path = read_checkpoint(self.out, log=log, mmap=True)
        if path.endswith(PREVIOUS) and os.path.exists(self.path(CHECKPOINT)):
            os.replace(self.path(CHECKPOINT), self.path(CHECKPOINT + ".damaged"))  # kept to look at, never reused
        if not os.path.exists(self.path("config.json")):  # a checkpoint without its config.json: the checkpoint's
            with open(self.path("config.json"), "w") as fh:
                json.dump(state["config"], fh, indent=2)
        changes = self._compare(cfg)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if state.get("world", 1) != world:
            raise RunFolderError(f"{path} was written by {state.get('world', 1)} processes and this run has {world}: "
                                 "resume with the same number of processes")  # fmt: skip
        if cfg.iterations <= state["iteration"]:
            raise RunFolderError(f"{path} is at iteration {state['iteration']} and iterations={cfg.iterations}: "
                                 f"nothing to train; raise iterations to continue (--set iterations=N)")  # fmt: skip
        if changes:
            with open(self.path("config_history.jsonl"), "a") as fh:
                fh.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_at": state["iteration"],
                                     "changes": changes}) + "\n")  # fmt: skip
            log("resume with changed settings (recorded in config_history.jsonl): "
                + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))  # fmt: skip
        return path

    def _compare(self, cfg: TrainConfig) -> dict:
        """The harmless changes of ``cfg`` against the run's settings; refuses any other change."""
        saved = effective_config(self.out)
        try:
            saved_cfg = TrainConfig.from_dict(saved, source=self.path("config.json")).to_dict()
        except SettingError as exc:
            raise RunFolderError(f"the run's {self.path('config.json')} cannot be read as settings: {exc}") from None
        new = cfg.to_dict()
        differ = {k: (saved_cfg[k], new[k]) for k in new if saved_cfg.get(k) != new[k]}
        refused = {k: v for k, v in differ.items() if k not in HARMLESS}
        if refused:
            shown = "; ".join(f"{k}: run {old!r}, now {new!r}" for k, (old, new) in refused.items())
            raise RunFolderError(f"cannot resume {self.out!r} with settings that change the experiment ({shown}). "
                                 f"Resume with the run's settings (they are in {self.path('config.json')}); only "
                                 f"{', '.join(HARMLESS)} may change. To train the new settings, use another folder "
                                 "or --overwrite")  # fmt: skip
        return {k: list(v) for k, v in differ.items()}

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def write_checkpoint(self, state: dict) -> None:
        """``checkpoint.pt``, written beside, read back and checked, then put in place; the checkpoint it replaces
        becomes ``checkpoint.prev.pt``. (Main process only.)"""
        final, tmp = self.path(CHECKPOINT), self.path(CHECKPOINT) + ".tmp"
        synced_torch_save(state, tmp)
        try:
            back = _load(tmp, mmap=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"the checkpoint just written to {tmp} does not read back ({_describe(exc)}): is "
                                  f"the disk full? {final} is unchanged") from exc  # fmt: skip
        if back["iteration"] != state["iteration"]:
            raise CheckpointError(f"the checkpoint just written to {tmp} reads back another iteration")
        if os.path.exists(final):
            os.replace(final, self.path(PREVIOUS))
        os.replace(tmp, final)
        _fsync_dir(self.out)

    def checkpoint_tags(self) -> set[str]:
        """The DeepSpeed tags the kept checkpoints name (their partitions must stay)."""
        tags = set()
        for name in (CHECKPOINT, PREVIOUS):
            try:
                tags.add(_load(self.path(name), mmap=True).get("deepspeed_tag"))
            except Exception:  # noqa: BLE001 - missing or damaged: names nothing
                pass
        return tags - {None}


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _quiet(*_args, **_kwargs) -> None:
    pass
