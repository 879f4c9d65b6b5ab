"""Build, apart from run: a config and the user's objects become the typed parts of a run.

``build_run`` is the one place that loads the models, builds the rewards, the data and the step plan, and
checks what depends on the objects given (checks that need only the config are in ``RLConfig.validate``).
``RLTrainer(...)`` is a thin front over it that keeps the parts; a test can call ``build_run`` (or one of the
per-concern builders) and drive a step from the parts without a trainer::

    inputs -> accelerator, output directory, plan -> models (actor, critic, reference, teacher)
           -> rewards (functions, weights, agent) -> data (datasets, sampler) -> optimizers, policy, state
"""

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from datasets import IterableDataset
from transformers import PreTrainedTokenizerBase, TrainerState, get_scheduler

from rlhf import trackers
from rlhf.agent import AgentLoop
from rlhf.callbacks import Callbacks, new_state
from rlhf.configs import RLConfig
from rlhf.critic import build_critic
from rlhf.data import PromptSampler, StreamSampler, as_dataset, check_prompts, dataset_columns, render_prompts
from rlhf.distributed import fill_deepspeed_config, make_accelerator, shards_parameters
from rlhf.environments import environment_dataset
from rlhf.evaluation import sampling_params
from rlhf.fingerprints import dataset_fingerprint, model_fingerprint
from rlhf.forward import enable_token_scoring
from rlhf.models import (
    absolute_positions,
    apply_lora,
    check_reference_options,
    disable_dropout,
    eos_token_ids,
    frozen_copy,
    input_vocab_size,
    load_causal_lm,
    load_teacher,
    load_tokenizer,
    output_vocab_size,
    resolve_dtype,
)
from rlhf.rewards import (
    RewardFunction,
    build_reward_functions,
    check_reward_columns,
    check_reward_weights,
    correctness_index,
)
from rlhf.rollout import Policy, generate_rollout
from rlhf.run_dir import RunDirectory
from rlhf.trainer.algorithms import BatchReduce, algorithm_for
from rlhf.trainer.kl import KLPenalty
from rlhf.trainer.plan import StepPlan, plan_step
from rlhf.trainer.update import NonFiniteGuard, TrainedModel

logger = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """What the user hands a trainer besides its config, under TRL's argument names."""

    model: Any
    reward_funcs: Any = None
    train_dataset: Any = None
    eval_dataset: Any = None
    processing_class: Any = None
    peft_config: Any = None
    reward_processing_classes: Any = None
    value_model: Any = None
    teacher_model: Any = None
    teacher_processing_class: Any = None
    callbacks: Any = None
    optimizers: tuple = (None, None)
    tools: Any = None
    environment_factory: Any = None


@dataclass
class Models:
    """The loaded, not yet prepared, models of a run and what was read from them."""

    tokenizer: PreTrainedTokenizerBase
    actor: torch.nn.Module
    critic: torch.nn.Module | None
    ref_model: torch.nn.Module | None  # None for a LoRA actor: its reference is the adapter disabled
    teacher: torch.nn.Module | None
    eos_ids: list[int]
    vocab_rows: int  # a prompt id past these is an IndexError at step 1
    fingerprint: str  # a resume must start from the same initial weights (its reference)
    source: str  # a .gguf path stays that: the loaders find its converted directory in the cache


@dataclass
class Rewards:
    """The reward functions with their weights, and the multi-turn agent when there are tools or an environment."""

    functions: list[RewardFunction]
    weights: list[float]
    agent: AgentLoop | None
    rollout_fn: Callable


@dataclass
class Data:
    """The datasets, checked against the rewards and the tokenizer, and the sampler that draws each step's prompts."""

    train_dataset: Any
    eval_dataset: Any
    num_prompts: int | None  # None for a stream
    sampler: PromptSampler | StreamSampler
    longest_prompt: int


@dataclass
class RunParts:
    """Everything a run is made of; ``RLTrainer`` keeps each field as an attribute of the same name."""

    args: RLConfig  # with the run-length fields made concrete (``RLConfig.for_dataset``)
    accelerator: Accelerator
    callbacks: Callbacks
    run: RunDirectory
    algorithm: Any
    plan: StepPlan
    kl: KLPenalty
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module  # the actor, prepared
    optimizer: torch.optim.Optimizer
    scheduler: Any
    actor: TrainedModel
    critic: torch.nn.Module | None  # prepared
    critic_model: TrainedModel | None
    ref_model: torch.nn.Module | None
    teacher: torch.nn.Module | None
    reward_functions: list[RewardFunction]
    reward_weights: list[float]
    agent: AgentLoop | None
    rollout_fn: Callable
    train_dataset: Any
    eval_dataset: Any
    num_prompts: int | None
    sampler: PromptSampler | StreamSampler
    policy: Policy
    sampling: dict
    reduce: BatchReduce
    guard: NonFiniteGuard
    state: TrainerState
    model_source: str
    identity: dict  # what the run is made from: saved in its checkpoints and compared on resume


def build_run(trainer_name: str, args: RLConfig, inputs: RunInputs) -> RunParts:
    """The parts of a run of ``args`` on ``inputs``, every check done before the first step."""
    check_inputs(args, inputs)
    callbacks = Callbacks(inputs.callbacks, args.callback_timeout)
    accelerator = make_accelerator(log_with=trackers.build(args) or None, project_dir=args.output_dir,
                                   mixed_precision=args.mixed_precision)
    args.validate(accelerator.num_processes, deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED,
                  sharded=shards_parameters(accelerator))
    # The output directory: locked for this run, refused if it holds another run's checkpoints (rlhf/run_dir.py).
    run = RunDirectory.claim(args.output_dir, accelerator, args.resume_from_checkpoint, args.overwrite_output_dir)
    algorithm = algorithm_for(args)
    teacher_model = inputs.teacher_model if inputs.teacher_model is not None else args.teacher_model
    plan = plan_step(args, accelerator.num_processes, shards_parameters(accelerator),
                     distilling=teacher_model is not None)
    # Micro-batches per mini-batch on each process; set before prepare() so DeepSpeed sees it too.
    accelerator.gradient_accumulation_steps = plan.mini_batch // plan.micro_batch
    if accelerator.state.deepspeed_plugin is not None:
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, plan.micro_batch,
                              accelerator.gradient_accumulation_steps, args.max_grad_norm)
    set_seed(args.seed, device_specific=True)  # every process draws different samples from the same prompts

    models = load_models(args, inputs, accelerator, plan, algorithm.has_critic, teacher_model)
    rewards = build_rewards(args, inputs, accelerator, models.tokenizer)
    data = load_data(args, inputs, accelerator, models, rewards)
    args = args.for_dataset(data.num_prompts)  # num_train_epochs, save_steps and warmup_ratio become steps
    check_positions(models.actor, args, data.longest_prompt, multi_turn=rewards.agent is not None)

    model, optimizer = accelerator.prepare(models.actor, make_optimizer(models.actor, args.learning_rate, args))
    scheduler = make_scheduler(optimizer, args)
    unwrapped = accelerator.unwrap_model(model)
    critic = critic_model = None
    if models.critic is not None:
        learning_rate = args.critic_learning_rate if args.critic_learning_rate is not None else args.learning_rate
        critic, critic_optimizer = accelerator.prepare(models.critic, make_optimizer(models.critic, learning_rate, args))
        critic_model = TrainedModel("critic/", critic, critic_optimizer, make_scheduler(critic_optimizer, args),
                                    accelerator.unwrap_model(critic), "critic")
    policy = Policy(model, accelerator, models.tokenizer, models.eos_ids, args.max_prompt_length,
                    args.truncate_prompts, prefill_group=args.share_prompt_prefix and not shards_parameters(accelerator),
                    autocast=args.autocast_generation is not False)  # None: yes
    identity = {"trainer": trainer_name, "num_processes": accelerator.num_processes, "model": models.source,
                "model_fingerprint": models.fingerprint, "train_dataset": dataset_fingerprint(data.train_dataset),
                "eval_dataset": dataset_fingerprint(data.eval_dataset),
                "reward_functions": [f.name for f in rewards.functions]}
    return RunParts(
        args=args, accelerator=accelerator, callbacks=callbacks, run=run, algorithm=algorithm, plan=plan,
        kl=KLPenalty(plan.kl_in, args.kl_coef, args.kl_estimator, args.kl_target, args.kl_horizon),
        tokenizer=models.tokenizer, model=model, optimizer=optimizer, scheduler=scheduler,
        actor=TrainedModel("", model, optimizer, scheduler, unwrapped, "model"), critic=critic,
        critic_model=critic_model, ref_model=models.ref_model, teacher=models.teacher,
        reward_functions=rewards.functions, reward_weights=rewards.weights, agent=rewards.agent,
        rollout_fn=rewards.rollout_fn, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
        num_prompts=data.num_prompts, sampler=data.sampler, policy=policy, sampling=sampling_params(args),
        reduce=BatchReduce(accelerator), guard=NonFiniteGuard(args.max_nonfinite_updates, args.output_dir,
                                                              run.checkpoints),
        state=new_state(args, accelerator, data.num_prompts), model_source=models.source, identity=identity)


def check_inputs(args: RLConfig, inputs: RunInputs) -> None:
    """The checks that need the objects given, not only the config (those are ``RLConfig.validate``)."""
    if any(o is not None for o in inputs.optimizers):
        raise ValueError("optimizers: the trainer builds its own AdamW and schedule from the config; set "
                         "learning_rate, lr_scheduler_type, warmup_steps, weight_decay, adam_beta1/2 instead.")
    multi_turn = bool(inputs.tools) or inputs.environment_factory is not None
    if multi_turn and args.rollout_correction is not None:
        raise ValueError(f"rollout_correction={args.rollout_correction!r} with tools or an environment: the "
                         "multi-turn rollout does not record the sampler's log-probs it needs. Leave it None.")


def load_models(args: RLConfig, inputs: RunInputs, accelerator: Accelerator, plan: StepPlan, has_critic: bool,
                teacher_model=None) -> Models:
    """The tokenizer, the actor (LoRA-wrapped when asked), PPO's critic (from the plain actor, before LoRA), the
    frozen reference and the teacher, each placed where the config says."""
    tokenizer = load_tokenizer(inputs.model, inputs.processing_class, args.trust_remote_code,
                               args.model_init_kwargs.get("revision"))
    actor = load_causal_lm(inputs.model, args.dtype, args.trust_remote_code, args.model_init_kwargs)
    vocab_rows, fingerprint, eos_ids = input_vocab_size(actor), model_fingerprint(actor), eos_token_ids(actor, tokenizer)
    if args.chunked_lm_head:
        enable_token_scoring(actor)  # log-probs without [B, T, V] logits; the reference copy inherits it
    critic = build_critic(inputs.value_model, actor, resolve_dtype(args.dtype), args.trust_remote_code) \
        if has_critic else None
    lora = inputs.peft_config is not None
    if lora:
        actor = apply_lora(actor, inputs.peft_config, args.gradient_checkpointing)
        if critic is not None:
            critic.add_lora(inputs.peft_config)
    for m in (actor, critic):
        if m is not None:
            disable_dropout(m)
            if args.gradient_checkpointing:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # A LoRA actor's reference is its base model with the adapter disabled: no second copy (pitfall 19).
    check_reference_options(args, lora=lora, has_reference=plan.kl_in is not None)
    ref_model = None
    if plan.kl_in is not None and not lora:
        ref_model = frozen_copy(actor, resolve_dtype(args.ref_model_dtype) if args.ref_model_dtype else None)
        ref_model.to("cpu" if args.offload_reference else accelerator.device)
    # On-policy distillation: a frozen teacher, scored like the reference (same forward path, same autocast).
    teacher = None
    if teacher_model is not None:
        teacher = load_teacher(teacher_model, tokenizer, args.teacher_dtype, args.dtype,
                               inputs.teacher_processing_class, args.trust_remote_code, output_vocab_size(actor))
        if args.chunked_lm_head:
            enable_token_scoring(teacher)
        teacher.to("cpu" if args.offload_teacher else accelerator.device)
        if args.filter_zero_std_groups:
            logger.warning("filter_zero_std_groups with a teacher: groups whose task rewards are all equal leave "
                           "the loss, and the teacher's signal on them with it.")
    source = (os.fspath(inputs.model) if isinstance(inputs.model, (str, os.PathLike))
              else getattr(actor.config, "_name_or_path", ""))
    return Models(tokenizer, actor, critic, ref_model, teacher, eos_ids, vocab_rows, fingerprint, source)


def build_rewards(args: RLConfig, inputs: RunInputs, accelerator: Accelerator,
                  tokenizer: PreTrainedTokenizerBase) -> Rewards:
    """The reward functions and models, their weights, and with tools or an environment the multi-turn agent whose
    rollouts (rlhf/agent.py) replace one completion per sample."""
    functions = build_reward_functions(
        inputs.reward_funcs, inputs.reward_processing_classes, device=accelerator.device,
        batch_size=args.reward_model_batch_size, normalize=args.normalize_reward_model_scores, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, timeout=args.reward_timeout,
        environment_factory=inputs.environment_factory)
    weights = check_reward_weights(args.reward_weights, functions)
    correctness_index(functions, args.accuracy_reward)  # an unknown name fails now, not at the first evaluation
    agent = (AgentLoop.from_config(tokenizer, inputs.tools, inputs.environment_factory, args)
             if inputs.tools or inputs.environment_factory is not None else None)
    return Rewards(functions, weights, agent, generate_rollout if agent is None else agent.rollout)


def load_data(args: RLConfig, inputs: RunInputs, accelerator: Accelerator, models: Models, rewards: Rewards) -> Data:
    """The datasets, each checked now (reward columns, prompt lengths and ids), and the prompt sampler."""
    train = as_dataset(environment_dataset(inputs.train_dataset, inputs.environment_factory, args), "train_dataset",
                       streaming=True)  # TRL: an environment may write the prompts
    evaluation = as_dataset(inputs.eval_dataset, "eval_dataset") if inputs.eval_dataset is not None else None
    render = rewards.agent.render_prompts if rewards.agent is not None else render_prompts
    longest_prompt = 0
    for name, dataset in (("train_dataset", train), ("eval_dataset", evaluation)):
        if dataset is not None:
            check_reward_columns(rewards.functions, dataset_columns(dataset), name)
            longest_prompt = max(longest_prompt, check_prompts(
                dataset, name, models.tokenizer, args.max_prompt_length, args.truncate_prompts, render=render,
                vocab_size=models.vocab_rows, schemas_of=rewards.agent.row_schemas if rewards.agent else None))
    streamed = isinstance(train, IterableDataset)
    if streamed and args.max_prompt_length:  # only the stream's first rows were measured
        longest_prompt = args.max_prompt_length
    if streamed and args.filter_zero_std_groups and args.max_sampling_rounds > 1:
        raise ValueError(f"max_sampling_rounds={args.max_sampling_rounds} with a streamed train_dataset: dynamic "
                         "sampling's refill rounds draw prompts at random, which a stream cannot do (and step k "
                         "must read rows k x prompts_per_step onwards to resume). Pass a Dataset, or set "
                         "max_sampling_rounds=1 (zero-variance groups are then only filtered).")
    num_prompts = None if streamed else len(train)
    sampler = (StreamSampler(args.prompts_per_step, accelerator.num_processes, accelerator.process_index)
               if streamed else PromptSampler(num_prompts, args.prompts_per_step, args.seed,
                                              accelerator.num_processes, accelerator.process_index))
    return Data(train, evaluation, num_prompts, sampler, longest_prompt)


def make_optimizer(model, learning_rate: float, args: RLConfig) -> torch.optim.Optimizer:
    """AdamW, with PyTorch's fused kernel where it exists (CPU and CUDA; 5x faster on CPU here)."""
    params = [p for p in model.parameters() if p.requires_grad]
    settings = dict(lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                    weight_decay=args.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **settings)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, **settings)


def make_scheduler(optimizer, args: RLConfig):
    """Warm-up then the configured decay, over every optimizer step of the run. Stepped by hand once per
    optimizer step (Accelerate's wrapper would step it once per process)."""
    return get_scheduler({"constant": "constant_with_warmup"}.get(args.lr_scheduler_type, args.lr_scheduler_type),
                         optimizer, num_warmup_steps=args.warmup_steps,
                         num_training_steps=args.max_steps * args.optimizer_steps_per_step)


def check_positions(actor, args: RLConfig, longest_prompt: int, multi_turn: bool) -> None:
    """A model with a learned absolute position table (GPT-2) cannot run past it: an error naming the numbers and the
    fields. A rotary model can, outside what it was trained on: a warning."""
    table = absolute_positions(actor)
    completion = (f"the trajectory budget (max_trajectory_tokens or max_turns x max_new_tokens) "
                  f"{args.trajectory_tokens}" if multi_turn else f"max_new_tokens={args.max_new_tokens}")
    longest = longest_prompt + (args.trajectory_tokens if multi_turn else args.max_new_tokens)
    if table is not None and longest > table:
        raise ValueError(f"The longest prompt ({longest_prompt} tokens) + {completion} = {longest} exceeds the "
                         f"model's {table} absolute positions (a learned position table, as GPT-2's n_positions): "
                         "past it the forward pass fails with an IndexError. Lower max_new_tokens, or bound the prompts "
                         "with max_prompt_length (with truncate_prompts=True, or filter the longer prompts out).")
    if table is not None:  # checked against the prompts themselves, not the limits
        return
    longest = args.max_new_tokens + (args.max_prompt_length or 0)
    positions = getattr(actor.config.get_text_config(), "max_position_embeddings", None)
    if positions is not None and longest > positions:
        logger.warning("max_prompt_length + max_new_tokens = %d exceeds the model's max_position_embeddings=%d; "
                       "positions past it are out of the range the model was trained on.", longest, positions)


def parts_of(parts: RunParts) -> dict:
    """``parts`` as a name -> object dict, without copying (``dataclasses.asdict`` would deep-copy the models)."""
    return {field.name: getattr(parts, field.name) for field in dataclasses.fields(parts)}
