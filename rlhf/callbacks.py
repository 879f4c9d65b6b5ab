"""Callbacks as TRL users write them, the trainer's ``state``, and what ``train()`` returns.

A callback is any object with some of transformers' ``TrainerCallback`` methods, a ``TrainerCallback`` subclass
included (a class is instantiated, as transformers does). Each event is called as transformers calls it:
``callback.on_step_end(args, state, control, model=..., processing_class=..., optimizer=..., lr_scheduler=...)``
with ``args`` the trainer's config, ``state`` a ``transformers.TrainerState`` (``global_step`` counts steps, one
rollout batch each; ``log_history`` holds every logged record) and ``control`` a ``transformers.TrainerControl``.
A callback stops the run with ``control.should_training_stop = True`` and asks for a log, an evaluation or a
checkpoint at the current step with ``should_log``, ``should_evaluate``, ``should_save``. One that hangs (past
``callback_timeout``) or calls ``sys.exit`` stops the run with a ``CallbackError`` naming it. Events:
on_init_end, on_train_begin, on_step_begin, on_step_end, on_log (``logs``), on_evaluate (``metrics``), on_save,
on_train_end.
"""

import logging
import math

import torch
from transformers import TrainerControl, TrainerState

from rlhf.user_code import UserExit, call_with_timeout, what_happened

logger = logging.getLogger(__name__)


class CallbackError(RuntimeError):
    """A callback hung (past ``callback_timeout``) or called ``sys.exit``; the message names it."""


EVENTS = ("on_init_end", "on_train_begin", "on_step_begin", "on_step_end", "on_log", "on_evaluate", "on_save",
          "on_train_end")


class Callbacks:
    """The run's callbacks, called in order; the ``control`` they share decides what happens next."""

    def __init__(self, callbacks=None, timeout: float | None = None):
        self.timeout = timeout  # seconds one callback event may take (callback_timeout; None: no limit)
        self.callbacks = []
        for callback in callbacks or []:
            self.add(callback)
        self.control = TrainerControl()

    def add(self, callback) -> None:
        """Append ``callback`` (a class is instantiated), as transformers' ``add_callback``."""
        callback = callback() if isinstance(callback, type) else callback
        if not any(callable(getattr(callback, event, None)) for event in EVENTS):
            raise TypeError(f"callback {callback!r} has none of the methods {list(EVENTS)}; subclass "
                            "transformers.TrainerCallback and override the events you need.")
        if any(type(c) is type(callback) for c in self.callbacks):
            logger.warning("A %s is already among the callbacks; it will be called twice.", type(callback).__name__)
        self.callbacks.append(callback)

    def pop(self, callback):
        """Remove and return ``callback``: that instance, or the first callback of that class (None if there is none),
        as transformers' ``pop_callback``."""
        for i, c in enumerate(self.callbacks):
            if (type(c) is callback) if isinstance(callback, type) else (c is callback):
                return self.callbacks.pop(i)
        return None

    def fire(self, event: str, args, state: TrainerState, **kwargs) -> TrainerControl:
        """Call ``event`` on every callback that has it; a callback that returns a control replaces the shared one
        (as transformers' CallbackHandler does). A run starts with no stop requested."""
        if event == "on_train_begin":
            self.control.should_training_stop = False
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                result = self._call(f"callback {type(callback).__name__}.{event}", state.global_step,
                                    lambda: method(args, state, self.control, **kwargs))
                if isinstance(result, TrainerControl):
                    self.control = result
        return self.control

    def _call(self, name: str, step: int, call):
        """``call()`` within ``timeout``. A hang or a ``sys.exit`` is a ``CallbackError`` naming the callback; an
        exception it raises goes on as it is (the user's own), with a note naming the callback."""
        try:
            return call_with_timeout(call, self.timeout, name)
        except TimeoutError:
            raise CallbackError(f"{name} did not return within callback_timeout={self.timeout:g} s at step {step}. "
                                "Make it faster (slow work such as uploads can run in a thread of its own), or raise "
                                "callback_timeout.") from None
        except UserExit as error:
            advice = "a callback must return; set control.should_training_stop = True to stop the run"
            raise CallbackError(f"{name} {what_happened(error, advice)} at step {step}.") from error
        except Exception as error:
            error.add_note(f"(raised by {name} at step {step}: fix the callback, or leave it out of callbacks)")
            raise

    def requested(self, flag: str, accelerator) -> bool:
        """Whether any process's callbacks set ``control.<flag>``, then clear it: every process must take the same
        branch (a save or an evaluation is collective, and a stop on one process alone would hang the others)."""
        wanted = bool(getattr(self.control, flag))
        if accelerator.num_processes > 1:
            wanted = bool(accelerator.reduce(torch.tensor([float(wanted)], device=accelerator.device),
                                             reduction="sum").item() > 0)
        if flag != "should_training_stop":
            setattr(self.control, flag, False)
        return wanted


def new_state(args, accelerator, num_prompts: int | None) -> TrainerState:
    """A ``TrainerState`` for a run of ``args`` over ``num_prompts`` training prompts (None: a stream)."""
    epochs = (args.max_steps * args.prompts_per_step / num_prompts) if num_prompts else None
    return TrainerState(epoch=0.0 if num_prompts else None, global_step=0, max_steps=args.max_steps,
                        logging_steps=args.logging_steps, eval_steps=args.eval_steps or None,
                        save_steps=args.save_steps or None, train_batch_size=args.rollout_batch_size,
                        num_train_epochs=math.ceil(epochs) if epochs else 0,
                        is_local_process_zero=accelerator.is_local_main_process,
                        is_world_process_zero=accelerator.is_main_process)


def epoch_at(step: int, prompts_per_step: int, num_prompts: int | None) -> float | None:
    """Passes over the training prompts after ``step`` steps (None for a stream of unknown length)."""
    return step * prompts_per_step / num_prompts if num_prompts else None


class TrainResult(tuple):
    """What ``train()`` returns, as transformers' ``TrainOutput``: ``(global_step, training_loss, metrics)``, by name
    or unpacked (``global_step, loss, metrics = trainer.train()``). ``training_loss`` is the summary's ``train_loss``
    (the mean of each step's ``loss/total``, as TRL reports it); ``metrics`` the last value of every metric, with the
    summary (``train_runtime``, ``train_loss``, ...) and ``epoch``. The logged records themselves (one dict per logged
    step or evaluation) are ``records``, and stay in ``trainer.state.log_history``."""

    def __new__(cls, records: list[dict], global_step: int, summary: dict | None = None, epoch: float | None = None):
        summary = {k: v for k, v in (summary or {}).items() if k not in ("step", "epoch")}
        metrics = {key: value for record in records for key, value in record.items() if key != "step"}
        metrics.update(summary)
        if epoch is not None:
            metrics["epoch"] = epoch
        result = super().__new__(cls, (global_step, summary.get("train_loss", float("nan")), metrics))
        result.records = list(records)
        return result

    global_step = property(lambda self: self[0])
    training_loss = property(lambda self: self[1])
    metrics = property(lambda self: self[2])
