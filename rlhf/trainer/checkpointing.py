"""Saving the model and checkpoints, and resuming from them (mixed into the trainer).

A checkpoint is written into ``checkpoint-<step>.tmp`` by all processes (each its RNG state), and
renamed to ``checkpoint-<step>`` by the main process once ``trainer_state.json`` (written last) is
in place, so a crash mid-write never leaves a directory that ``"latest"`` would pick.
"""

import copy
import os
import shutil

from rlhf import checkpoint as ckpt


class Checkpointing:
    """Needs ``args``, ``accelerator``, ``model``, ``optimizer``, ``scheduler``, ``tokenizer``, ``step``."""

    def save_model(self, path: str | None = None) -> str:
        """Write the actor and tokenizer (safetensors) so that ``from_pretrained(path)`` loads them; a LoRA
        actor writes its adapter (``PeftModel.from_pretrained``), or with ``save_merged_lora`` the merged
        model. Default: ``output_dir/model``. Other files already in ``path`` are left alone."""
        path = path or os.path.join(self.args.output_dir, "model")
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            model = self.unwrapped_model
            if self.args.save_merged_lora and hasattr(model, "merge_and_unload"):
                # Merge into a copy: merging and unmerging in place would not restore the weights bit for bit.
                model, state_dict = copy.deepcopy(model).merge_and_unload(), None
            with ckpt.staged_directory(path) as tmp:
                ckpt.save_pretrained_model(model, self.tokenizer, tmp, state_dict)
        self.accelerator.wait_for_everyone()
        return path

    def checkpoint_state(self) -> dict:
        """JSON-serialisable trainer state saved with every checkpoint."""
        return {"step": self.step, "config": self.args.to_dict(), "num_processes": self.accelerator.num_processes,
                "kl_coef": self.kl_coef, "model": self.model_source, "trainer": type(self).__name__}

    def save_checkpoint(self) -> str:
        """``output_dir/checkpoint-<step>``: model, optimizer, scheduler, RNG of every process, state."""
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.step}")
        tmp = f"{path}.tmp"
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(self.model)
        extra = self.extra_state_dicts()  # collective under sharded training: every process takes part
        if accelerator.is_main_process:
            for stale in (tmp, f"{path}.old"):
                shutil.rmtree(stale, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        ckpt.save_torch_state(ckpt.rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pt"))
        if accelerator.is_main_process:
            ckpt.save_pretrained_model(self.unwrapped_model, self.tokenizer, os.path.join(tmp, "model"), state_dict)
            ckpt.save_torch_state(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            ckpt.save_torch_state(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            self.save_extra_state(tmp, extra)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.write_state(tmp, self.checkpoint_state())  # written last: marks the checkpoint complete
            if os.path.exists(path):
                os.rename(path, f"{path}.old")
            os.rename(tmp, path)
            shutil.rmtree(f"{path}.old", ignore_errors=True)
            ckpt.rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        accelerator.wait_for_everyone()
        return path

    def extra_state_dicts(self) -> dict:
        """State dicts of extra models (e.g. a critic), gathered on every process for ``save_extra_state``."""
        return {}

    def save_extra_state(self, directory: str, state_dicts: dict) -> None:
        """Algorithm-specific state (e.g. a critic); written by the main process."""

    def load_extra_state(self, directory: str) -> None:
        """Counterpart of ``save_extra_state``."""

    def load_checkpoint(self, path: str) -> None:
        """Restore everything ``save_checkpoint`` wrote; ``"latest"`` picks the newest in ``output_dir``."""
        if path == "latest":
            path = ckpt.latest_checkpoint(self.args.output_dir)
            if path is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint='latest' but {self.args.output_dir!r} holds no complete checkpoint."
                )
        if not os.path.isfile(os.path.join(path, ckpt.STATE_FILE)):
            raise FileNotFoundError(f"{path!r} is not a complete checkpoint (no {ckpt.STATE_FILE}).")
        state = ckpt.read_state(path)
        self._check_resumable(state)
        ckpt.load_model_weights(self.unwrapped_model, os.path.join(path, "model"))
        self.optimizer.load_state_dict(ckpt.load_torch_state(os.path.join(path, "optimizer.pt")))
        self.scheduler.load_state_dict(ckpt.load_torch_state(os.path.join(path, "scheduler.pt")))
        ckpt.set_rng_state(ckpt.load_torch_state(os.path.join(path, f"rng_state_{self.accelerator.process_index}.pt")))
        self.load_extra_state(path)
        self.step = state["step"]
        self.kl_coef = state["kl_coef"]
        self.accelerator.print(f"Resumed from {path} at step {self.step}.")

    def _check_resumable(self, state: dict) -> None:
        """A checkpoint only resumes under the settings that give its step the same meaning."""
        saved, current = dict(state["config"]), self.args.to_dict()
        for config in (saved, current):  # None means "the whole rollout batch"
            config["mini_batch_size"] = config.get("mini_batch_size") or (
                config["prompts_per_step"] * config["num_generations"])
        fields = ("prompts_per_step", "num_generations", "mini_batch_size", "num_epochs", "seed")
        changed = [f"{f}: checkpoint {saved.get(f)!r}, now {current[f]!r}" for f in fields if saved.get(f) != current[f]]
        for key, now in (("model", self.model_source), ("trainer", type(self).__name__)):
            if state.get(key) != now:
                changed.append(f"{key}: checkpoint {state.get(key)!r}, now {now!r}")
        if state.get("num_processes") != self.accelerator.num_processes:
            changed.append(f"number of processes: checkpoint {state.get('num_processes')}, "
                           f"now {self.accelerator.num_processes}")
        if changed:
            raise ValueError("Cannot resume: the checkpoint was made with different settings (" + "; ".join(changed)
                             + "). Resume with the same values, or start a new run in another output_dir.")
