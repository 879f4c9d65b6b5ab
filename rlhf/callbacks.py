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

import math

import torch
from transformers import TrainerControl, TrainerState

from rlhf.user_code import UserExit, call_with_timeout, what_happened


class CallbackError(RuntimeError):
    """A callback hung (past ``callback_timeout``) or called ``sys.exit``; the message names it."""


EVENTS = ("on_init_end", "on_train_begin", "on_step_begin", "on_step_end", "on_log", "on_evaluate", "on_save",
          "on_train_end")


class Callbacks:
    """The run's callbacks, called in order; the ``control`` they share decides what happens next."""

    def __init__(self, callbacks=None, timeout: float | None = None):
        self.timeout = timeout  # seconds one callback event may take (callback_timeout; None: no limit)
        self.callbacks = [callback() if isinstance(callback, type) else callback for callback in (callbacks or [])]
        for callback in self.callbacks:
            if not any(callable(getattr(callback, event, None)) for event in EVENTS):
                raise TypeError(f"callback {callback!r} has none of the methods {list(EVENTS)}; subclass "
                                "transformers.TrainerCallback and override the events you need.")
        self.control = TrainerControl()

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


class TrainResult(list):
    """What ``train()`` returns: the logged metric records (a list, one dict per logged step or evaluation), with
    what transformers' ``TrainOutput`` holds as attributes: ``global_step``, ``training_loss`` (the mean of the logged
    policy losses) and ``metrics`` (the last value of every metric, ``train_runtime``, ``epoch``)."""

    def __init__(self, records: list[dict], global_step: int, runtime: float = 0.0, epoch: float | None = None,
                 steps_run: int = 0):
        super().__init__(records)
        self.global_step = global_step
        losses = [r["loss/policy"] for r in records if isinstance(r.get("loss/policy"), float)]
        self.training_loss = sum(losses) / len(losses) if losses else float("nan")
        self.metrics = {key: value for record in records for key, value in record.items() if key != "step"}
        self.metrics.update(train_runtime=runtime, train_loss=self.training_loss,
                            train_steps_per_second=steps_run / runtime if runtime else 0.0)
        if epoch is not None:
            self.metrics["epoch"] = epoch
