"""PPO for language models (Schulman et al., 2017; Ouyang et al., 2022) with a separate critic.

- The critic is a transformer backbone + a scalar value head, with its own AdamW and learning rate;
  by default a copy of the actor's backbone, or ``value_model`` (a path, e.g. a trained reward model,
  or a model object). ``critic_warmup_steps`` trains it alone first.
- Token rewards: the sequence reward on the last completion token, minus ``kl_coef * KL`` per token
  (k1 by default; ``kl_in="loss"`` moves the KL into the loss); ``kl_target`` adapts kl_coef.
- GAE over the completion tokens with the values of the rollout; returns = advantages + values,
  computed before the advantages are whitened over the rollout batch.
- Old log-probs and old values are computed once per rollout batch, before any update; the update
  is ``num_epochs`` passes of shuffled mini-batches of clipped policy loss + ``vf_coef`` x clipped
  value loss, optionally stopped early when the approximate KL passes ``target_kl``.
"""

import os

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from rlhf import checkpoint as ckpt
from rlhf.configs import PPOConfig
from rlhf.core import gae, value_loss
from rlhf.critic import VALUE_HEAD_FILE, build_critic, completion_values
from rlhf.models import disable_dropout, resolve_dtype
from rlhf.rollout import Batch
from rlhf.trainer.token_rewards import TokenRewardTrainer

CRITIC_DIR = "critic"


class PPOTrainer(TokenRewardTrainer):
    config_class = PPOConfig

    def __init__(self, model, reward_funcs, args: PPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, reward_processing_classes=None, value_model=None):
        self._value_model = value_model
        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config,
                         reward_processing_classes=reward_processing_classes)

    def init_algorithm(self, actor) -> None:
        super().init_algorithm(actor)
        args = self.args
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("PPO trains two models (actor and critic), which one Accelerate DeepSpeed engine does "
                             "not support; use DDP or FSDP for PPO (recipes/accelerate/multi_gpu.yaml, fsdp.yaml), "
                             "or GRPO / REINFORCE under DeepSpeed.")
        critic = build_critic(self._value_model, actor, resolve_dtype(args.dtype), args.trust_remote_code)
        self._value_model = None
        if self.peft_config is not None:
            critic.add_lora(self.peft_config)
        disable_dropout(critic)
        if args.gradient_checkpointing:
            critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        learning_rate = args.critic_learning_rate if args.critic_learning_rate is not None else args.learning_rate
        self.critic, self.critic_optimizer = self.accelerator.prepare(critic, self.make_optimizer(critic, learning_rate))
        self.critic_scheduler = self.make_scheduler(self.critic_optimizer)

    @property
    def trained_models(self) -> list:
        return [self.critic] if self.critic_warming_up else [self.model, self.critic]

    @property
    def critic_warming_up(self) -> bool:
        return self.step < self.args.critic_warmup_steps

    # ------------------------------------------------------------------ experience
    def compute_reference_logprobs(self, batch: Batch) -> None:
        super().compute_reference_logprobs(batch)
        self.critic.eval()
        batch["old_values"] = self.no_grad_pass(lambda micro: self._values(micro), batch)

    def _values(self, micro: Batch) -> torch.Tensor:
        return completion_values(self.critic, micro["prompt_ids"], micro["prompt_mask"], micro["completion_ids"],
                                 micro["completion_mask"], self.prefix_group_size, self.unwrapped_critic)

    def compute_advantages(self, batch: Batch, rewards: torch.Tensor, metrics) -> None:
        args = self.args
        mask = batch["completion_mask"]
        values = batch["old_values"]
        advantages, returns = gae(self.token_rewards(batch, rewards, metrics), values, mask, args.gamma,
                                  args.gae_lambda)
        returns_mean, returns_var = self.global_mean_var(returns, mask)
        values_mean, _ = self.global_mean_var(values, mask)
        _, residual_var = self.global_mean_var(returns - values, mask)
        metrics.add("critic/returns_mean", returns_mean)
        metrics.add("critic/values_mean", values_mean)
        metrics.add("critic/explained_variance", 1 - residual_var / returns_var.clamp(min=1e-12))
        if args.whiten_advantages:
            advantages = self.global_whiten(advantages, mask)
        self.log_token_advantages(advantages, mask, metrics)
        batch["advantages"] = advantages
        batch["returns"] = returns

    # ------------------------------------------------------------------ update
    def compute_loss(self, micro: Batch, denominators: dict, metrics) -> torch.Tensor:
        args = self.args
        values = self._values(micro)
        loss_v, stats = value_loss(values, micro["old_values"], micro["returns"], micro["loss_mask"],
                                   args.value_clip_eps, "token-mean", num_tokens=denominators["num_tokens"])
        self.record_loss(metrics, "loss/value", loss_v)
        metrics.add("critic/value_clip_frac", stats["value_clip_frac"], micro["loss_mask"].sum())
        loss = args.vf_coef * loss_v
        if not self.critic_warming_up:
            loss = loss + self.actor_loss(micro, denominators, metrics)
        return loss

    def optimization_targets(self) -> list:
        critic = [("critic/", self.critic, self.critic_optimizer, self.critic_scheduler)]
        return critic if self.critic_warming_up else super().optimization_targets() + critic

    def should_stop_update(self, metrics) -> bool:
        target = self.args.target_kl
        if target is None or self.critic_warming_up or self.mini_batch_approx_kl() <= target:
            return False
        metrics.add("policy/early_stopped", 1.0)
        return True

    # ------------------------------------------------------------------ saving
    @property
    def unwrapped_critic(self):
        return self.accelerator.unwrap_model(self.critic)

    def save_critic(self, path: str) -> str:
        """Write the critic (backbone + value head, safetensors); ``ValueModel.from_pretrained`` loads it."""
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.critic)
        if self.accelerator.is_main_process:
            with ckpt.staged_directory(path) as tmp:
                self.unwrapped_critic.save_pretrained(tmp, state_dict=state_dict)
        self.accelerator.wait_for_everyone()
        return path

    def save_extra_state(self, directory: str, state_dicts: dict) -> None:
        self.unwrapped_critic.save_pretrained(os.path.join(directory, CRITIC_DIR), state_dict=state_dicts["critic"])
        ckpt.save_torch_state(self.critic_optimizer.state_dict(), os.path.join(directory, "critic_optimizer.pt"))
        ckpt.save_torch_state(self.critic_scheduler.state_dict(), os.path.join(directory, "critic_scheduler.pt"))

    def extra_state_dicts(self) -> dict:
        return {"critic": self.accelerator.get_state_dict(self.critic)}

    def load_extra_state(self, directory: str) -> None:
        critic_dir = os.path.join(directory, CRITIC_DIR)
        ckpt.load_model_weights(self.unwrapped_critic.backbone, critic_dir)
        head = load_file(os.path.join(critic_dir, VALUE_HEAD_FILE))
        self.unwrapped_critic.value_head.load_state_dict(head)
        self.critic_optimizer.load_state_dict(ckpt.load_torch_state(os.path.join(directory, "critic_optimizer.pt")))
        self.critic_scheduler.load_state_dict(ckpt.load_torch_state(os.path.join(directory, "critic_scheduler.pt")))
