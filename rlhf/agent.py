"""Multi-turn rollouts: the policy acts, tools or an environment answer, and only the policy's tokens learn.

``AgentLoop.rollout`` replaces ``rlhf.rollout.generate_rollout`` when the trainer is given ``tools`` or an
``environment_factory``; it returns the same ``Rollout`` and ``RolloutTexts``. One trajectory, per prompt
and generation, is

    prompt | policy turn (ends at an EOS) | environment turn | policy turn | ... | policy turn

and all of it after the prompt is the "completion": ``completion_mask`` is 1 on every token of it (the
model attends to them all), ``policy_mask`` only on the tokens the policy sampled. The policy's ids are
kept as sampled, never re-tokenised from text; environment turns are rendered by the chat template (or
the plain-text format of ``rlhf.tools``) and tokenised on their own. The loss, every token count, the
KL and the advantage estimators read ``policy_mask``; per-turn environment rewards sit on the last policy
token of their turn (``Rollout.turn_rewards``).

After a policy turn: a turn with ``<tool_call>`` blocks gets one tool message per call and the policy
continues; otherwise an environment of our protocol's ``step(text)`` answers; otherwise the trajectory is done. It also
ends, marked truncated, when a turn reaches ``max_new_tokens`` without an EOS, when the policy still
wants to continue after ``max_turns`` turns, or when the next turn would not fit in ``max_tokens`` (the
environment's tokens count too).

An environment (``environment_factory()`` returns one; instances are reused, each episode starts with
``reset``) follows our protocol or TRL 1.16's (``rlhf.environments``). Ours has two methods:

    reset(row: dict) -> None | str | list[dict]       # the first observation: the prompt the policy sees
                                                      # (None: the row's own prompt)
    step(text: str) -> (observation | None, reward | None)   # None: the episode is over

An observation is a string (chat prompts: the content of a user message) or chat message(s). TRL's has
``reset(**row)`` (its string appended to the prompt) and public methods, which are the episode's tools (shown
with the ``tools``; a turn without a tool call ends the episode). An exception in ``reset``, ``step`` or the
factory (or a ``sys.exit``, or a call past ``environment_timeout``) stops the run with the environment's name:
unlike a tool, it is code the user owns, not something the policy did.
"""

import dataclasses
from dataclasses import dataclass, field

import torch

from rlhf.data import is_conversational, left_pad, render_prompts, tokenize_prompts
from rlhf.distributed import needs_synced_generation
from rlhf.environments import (
    STEP,
    TOOLS,
    check_environment,
    describe_environments,
    environment_call,
    factory_name,
    observation_messages,
    reset_tools_environment,
    step_environment,
)
from rlhf.rollout import Policy, Rollout, RolloutTexts, SamplingParams, generate
from rlhf.tools import ToolExecutor, describe_tools, parse_tool_calls, tool_schemas

EPISODE_STATS = ("turns", "tool_call_rate", "tool_calls", "tool_errors", "tool_timeouts", "tool_long_results",
                 "tool_bad_calls", "environment_tokens", "max_turns_frac", "token_budget_frac")
"""Per trajectory, logged as ``agent/<name>`` (the mean over trajectories): policy turns; whether it called a
tool; tool calls, and those that raised, timed out, returned more than ``max_tool_response_chars`` or could
not run (unparsable, unknown tool, wrong arguments); environment tokens; whether ``max_turns`` or the token
budget ended it."""
_CONTENT_END = "<<rlhf:end-of-content>>"


def last_assistant_text(completion) -> str:
    """The text of the last assistant message of a multi-turn completion (a single-turn string as it is): what a
    final-answer reward reads."""
    if isinstance(completion, str):
        return completion
    return next((m.get("content") or "" for m in reversed(completion) if m.get("role") == "assistant"), "")


@dataclass
class Episode:
    """One trajectory under construction. ``ids``, ``policy`` and ``rewards`` run over the tokens after the prompt."""

    prompt: object  # what the policy was shown first: a string or chat messages
    environment: object | None = None
    steps: bool = False  # the environment follows our protocol: step() answers a turn without a tool call
    schemas: list[dict] = field(default_factory=list)  # the tools its prompt shows
    methods: dict = field(default_factory=dict)  # a TRL-style environment's tools, bound to its instance
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    policy: list[int] = field(default_factory=list)  # 1 where the policy sampled the token
    rewards: list[float] = field(default_factory=list)  # the environment's, on each turn's last policy token
    messages: list[dict] = field(default_factory=list)
    raw_turn: str = ""  # the last policy turn decoded with special tokens, where tool calls are looked for
    done: bool = False
    truncated: bool = False
    stats: dict = field(default_factory=lambda: dict.fromkeys(EPISODE_STATS, 0.0))

    def end(self, truncated: bool = False, reason: str | None = None) -> None:
        """Done; ``truncated`` when it wanted to go on, ``reason`` the statistic that says why."""
        self.done, self.truncated = True, truncated
        if reason is not None:
            self.stats[reason] = 1.0


class AgentLoop:
    """Tools and / or an environment, with the limits of a trajectory; ``rollout`` runs the episodes."""

    def __init__(self, tokenizer, tools=None, environment_factory=None, *, max_turns: int, max_tokens: int,
                 tool_timeout: float, max_tool_response_chars: int, tool_workers: int,
                 environment_timeout: float | None = None):
        if not tools and environment_factory is None:
            raise ValueError("AgentLoop needs tools, an environment_factory, or both.")
        self.tokenizer = tokenizer
        self.tools = tools = list(tools or [])
        self.schemas = tool_schemas(tools) if tools else []  # the standalone tools, then every environment's
        self.environment_factory = environment_factory
        self.environment_timeout = environment_timeout
        self.specs = ([] if environment_factory is None
                      else describe_environments(environment_factory, environment_timeout))
        self.multi = isinstance(environment_factory, dict)
        self.shown = {spec.name: self.schemas + spec.schemas for spec in self.specs}  # the tools of its prompts
        names = {s["function"]["name"] for s in self.schemas}
        for spec in self.specs:
            clash = sorted(names.intersection(spec.tool_names))
            if clash:
                raise ValueError(f"environment {spec.cls.__name__}'s method(s) {clash} have the name of a function in "
                                 "tools; the model calls tools by name, so rename one of them.")
        for spec in self.specs:  # the union, each name once: what prompts are checked with before training
            self.schemas += [s for s in spec.schemas if s["function"]["name"] not in names]
            names.update(spec.tool_names)
        self.executor = (ToolExecutor(tools, tool_timeout, max_tool_response_chars, tool_workers)
                         if tools or any(spec.protocol == TOOLS for spec in self.specs) else None)
        self.pools = {spec.name: [spec.probe] if spec.probe is not None else [] for spec in self.specs}
        self.max_turns, self.max_tokens = max_turns, max_tokens
        self.template_tools = bool(self.schemas) and _template_renders_tools(tokenizer, self.schemas)
        self._turn_end = None

    @classmethod
    def from_config(cls, tokenizer, tools, environment_factory, args) -> "AgentLoop":
        return cls(tokenizer, tools, environment_factory, max_turns=args.max_turns, max_tokens=args.trajectory_tokens,
                   tool_timeout=args.tool_timeout, max_tool_response_chars=args.max_tool_response_chars,
                   tool_workers=args.tool_workers, environment_timeout=args.environment_timeout)

    # ------------------------------------------------------------------ rendering
    def render_prompts(self, prompts, tokenizer=None, schemas=None) -> tuple[list[str], bool]:
        """Prompt texts with the tools shown (``schemas``: each prompt's; default all of them): through the chat
        template's ``tools`` when it renders them, else the plain-text description (a system message for chat
        prompts, a preamble for plain text)."""
        tokenizer = tokenizer or self.tokenizer
        schemas = schemas if schemas is not None else [self.schemas] * len(prompts)
        if not any(schemas) or not prompts:
            return render_prompts(prompts, tokenizer)
        if not is_conversational(prompts[0]):
            texts, _ = render_prompts(prompts, tokenizer)
            return [f"{describe_tools(s)}\n\n{text}" if s else text for text, s in zip(texts, schemas)], False
        if not self.template_tools:
            return render_prompts([_with_system(p, describe_tools(s)) if s else p for p, s in zip(prompts, schemas)],
                                  tokenizer)
        render_prompts(prompts, tokenizer)  # checks: every prompt chat messages, a template exists
        return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False,
                                              **({"tools": s} if s else {})) for p, s in zip(prompts, schemas)], True

    def environment_ids(self, is_chat: bool, assistant: dict, messages: list[dict]) -> list[int]:
        """Token ids of an environment turn (``messages``) after a policy turn that ended with an EOS (``assistant``):
        the rest of the template's end of that turn, the messages, and the header of the next assistant turn."""
        if not is_chat:
            text = "".join(f"\n<tool_response>\n{m['content']}\n</tool_response>\n" if m["role"] == "tool"
                           else m["content"] for m in messages)
        else:
            text = self.turn_end + self._chat_suffix(assistant, messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def turn_end(self) -> str:
        """What the chat template writes after an assistant message's content, minus the EOS that the policy
        wrote itself (Qwen: "\\n" after <|im_end|>; a template without an EOS there: all of it)."""
        if self._turn_end is None:
            text = self._apply([{"role": "user", "content": "u"}, {"role": "assistant", "content": _CONTENT_END}],
                               False)
            after = text[text.rindex(_CONTENT_END) + len(_CONTENT_END):]
            eos = self.tokenizer.convert_ids_to_tokens(self.tokenizer.eos_token_id)
            self._turn_end = after.split(eos, 1)[1] if eos and eos in after else after
        return self._turn_end

    def _apply(self, messages, generation_prompt: bool) -> str:
        tools = {"tools": self.schemas} if self.template_tools else {}
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                                  **tools)

    def _chat_suffix(self, assistant: dict, messages: list[dict]) -> str:
        calls = {"tool_calls": assistant["tool_calls"]} if assistant.get("tool_calls") else {}
        dummy = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x", **calls}]
        prefix, full = self._apply(dummy, False), self._apply(dummy + messages, True)
        if not full.startswith(prefix):
            raise ValueError("The chat template renders a conversation differently once messages follow it, so "
                             "environment turns cannot be appended to the sampled tokens; use a template that "
                             "renders earlier messages the same whatever follows.")
        return full[len(prefix):]

    def conversation_ids(self, prompt, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, ids after the prompt, policy mask) of a whole conversation as a rollout would build it, with
        the assistant turns' text tokenised (for warm-start data; a rollout keeps the sampled ids instead)."""
        texts, is_chat = self.render_prompts([prompt])
        prompt_ids = tokenize_prompts(texts, self.tokenizer, is_chat)[0]
        ids, policy, k = [], [], 0
        while k < len(messages):
            if messages[k]["role"] == "assistant":
                turn = self.tokenizer(messages[k]["content"], add_special_tokens=False)["input_ids"]
                turn, k = turn + [self.tokenizer.eos_token_id], k + 1
                ids, policy = ids + turn, policy + [1] * len(turn)
            else:  # the environment's messages up to the next assistant turn
                end = next((j for j in range(k, len(messages)) if messages[j]["role"] == "assistant"), len(messages))
                env = self.environment_ids(is_chat, messages[k - 1] if k else {}, messages[k:end])
                ids, policy, k = ids + env, policy + [0] * len(env), end
        return prompt_ids, ids, policy

    # ------------------------------------------------------------------ the loop
    def rollout(self, policy: Policy, rows: dict, params: SamplingParams, num_generations: int,
                ) -> tuple[Rollout, RolloutTexts]:
        """``num_generations`` trajectories for each prompt of ``rows`` (a dataset slice), those of one prompt in
        contiguous rows: the tensors, and the texts reward functions see (``completions`` are message lists)."""
        n = num_generations
        row_list = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["prompt"]))]
        episodes = self._start(policy, [row for row in row_list for _ in range(n)])
        is_chat = is_conversational(episodes[0].prompt)
        synced = needs_synced_generation(policy.accelerator)
        for turn in range(self.max_turns):
            active = [e for e in episodes if not e.done]
            if not _any_process(policy.accelerator, bool(active), synced):
                break
            if not active:  # sharded models generate in lockstep: keep stepping with the other processes
                self._policy_turn(policy, [Episode(episodes[0].prompt, prompt_ids=episodes[0].prompt_ids)], params, 1)
                continue
            self._policy_turn(policy, active, params, n if turn == 0 else 1)
            self._respond([e for e in active if not e.done], is_chat, turns_left=turn + 1 < self.max_turns)
        return self._assemble(policy, episodes, rows, n)

    def _start(self, policy: Policy, rows: list[dict]) -> list[Episode]:
        if not self.specs:
            episodes = [Episode(row["prompt"], schemas=self.schemas) for row in rows]
        else:
            timeout, drawn = self.environment_timeout, dict.fromkeys(self.pools, 0)
            episodes = []
            for row in rows:  # each row gets an instance of its environment from the pool, made when there is none
                spec = self._spec_of(row)
                pool = self.pools[spec.name]
                if drawn[spec.name] == len(pool):
                    pool.append(environment_call(spec.factory, f"environment_factory {factory_name(spec.factory)}",
                                                 timeout))
                env, shown = pool[drawn[spec.name]], self.shown[spec.name]
                drawn[spec.name] += 1
                if spec.protocol == STEP:
                    check_environment(env, spec.factory)
                    first = environment_call(env.reset, f"environment {type(env).__name__}.reset", timeout, row)
                    episodes.append(Episode(row["prompt"] if first is None else first, env, True, shown))
                else:
                    prompt = reset_tools_environment(env, row, self.multi, timeout)
                    episodes.append(Episode(prompt, env, False, shown, spec.methods(env)))
        texts, is_chat = self.render_prompts([e.prompt for e in episodes], schemas=[e.schemas for e in episodes])
        prompt_ids = tokenize_prompts(texts, self.tokenizer, is_chat, policy.max_prompt_length, policy.truncate_prompts)
        for e, ids in zip(episodes, prompt_ids):
            e.prompt_ids = ids
        return episodes

    def row_schemas(self, rows: dict) -> list[list[dict]] | None:
        """The tools each row of ``rows`` (a batch of columns) is shown: with a dict environment_factory only its own
        environment's (and ``tools``); None when every row is shown all of them."""
        if not self.multi:
            return None
        return [self.shown[self._spec_of(dict(zip(rows, values))).name] for values in zip(*rows.values())]

    def _spec_of(self, row: dict):
        """The environment of ``row``: the only one, or the one its ``environment`` column names."""
        if not self.multi:
            return self.specs[0]
        names = [spec.name for spec in self.specs]
        if "environment" not in row:
            raise ValueError(f"environment_factory is a dict of environments {names}, so each row needs an "
                             f"`environment` column naming its environment; the rows have {sorted(row)}.")
        spec = next((spec for spec in self.specs if spec.name == row["environment"]), None)
        if spec is None:
            raise ValueError(f"A row has environment={row['environment']!r}, which is not among the environments "
                             f"passed to environment_factory: {names}. Add a factory under that name, or fix the "
                             "row's `environment` column.")
        return spec

    def _policy_turn(self, policy: Policy, episodes: list[Episode], params: SamplingParams, group_size: int) -> None:
        """One turn of every episode: generate in one batch, keep each row's tokens up to its EOS and its budget."""
        budgets = [self.max_tokens - len(e.ids) for e in episodes]
        ids, mask = left_pad([e.prompt_ids + e.ids for e in episodes], self.tokenizer.pad_token_id)
        longest = min(params.max_new_tokens, max(budgets))
        turn_params = dataclasses.replace(params, max_new_tokens=longest,
                                          min_new_tokens=min(params.min_new_tokens, longest))
        device = policy.accelerator.device
        completion_ids, completion_mask, no_eos, _ = generate(policy, ids.to(device), mask.to(device), turn_params,
                                                              group_size)  # the sampler log-probs: unused here
        lengths = completion_mask.sum(dim=1).tolist()
        for e, row, length, cut, budget in zip(episodes, completion_ids.tolist(), lengths, no_eos.tolist(), budgets):
            turn = row[:min(length, budget)]
            e.ids, e.policy, e.rewards = e.ids + turn, e.policy + [1] * len(turn), e.rewards + [0.0] * len(turn)
            e.messages.append({"role": "assistant",
                               "content": self.tokenizer.decode(turn, skip_special_tokens=True)})
            e.raw_turn = self.tokenizer.decode(turn, skip_special_tokens=False)
            e.stats["turns"] += 1
            if cut or length > budget:  # no EOS within max_new_tokens, or within what is left of the budget
                by_budget = length >= budget and budget < params.max_new_tokens
                e.end(truncated=True, reason="token_budget_frac" if by_budget else None)

    def _respond(self, episodes: list[Episode], is_chat: bool, turns_left: bool) -> None:
        """The tools' or the environment's answer to each episode's last policy turn, appended when it fits."""
        replies: dict[int, list[dict]] = {}
        calls_of: list[tuple[Episode, list]] = []
        for e in episodes:
            calls = parse_tool_calls(e.raw_turn) if self.tools or e.methods else []
            if calls:
                e.messages[-1]["tool_calls"] = [c.as_message_call() for c in calls if c.error is None]
                e.stats["tool_calls"] += len(calls)
                e.stats["tool_call_rate"] = 1.0
                if turns_left:
                    calls_of.append((e, calls))
                else:
                    e.end(truncated=True, reason="max_turns_frac")
            elif e.steps:
                observation, reward = step_environment(e.environment, e.messages[-1]["content"],
                                                       self.environment_timeout)
                e.rewards[-1] += reward
                if observation is None:
                    e.end()
                elif not turns_left:
                    e.end(truncated=True, reason="max_turns_frac")
                else:
                    replies[id(e)] = observation_messages(observation, is_chat, e.environment)
            else:
                e.end()
        if calls_of:
            results = iter(self.executor.run([c for _, calls in calls_of for c in calls],
                                             [e.methods for e, calls in calls_of for _ in calls]))
            for e, calls in calls_of:
                replies[id(e)] = []
                for _ in calls:
                    result = next(results)
                    status = {"error": "tool_errors", "timeout": "tool_timeouts", "long": "tool_long_results",
                              "bad_call": "tool_bad_calls"}.get(result.status)
                    if status is not None:
                        e.stats[status] += 1
                    replies[id(e)].append({"role": "tool", "name": result.name, "content": result.content})
        for e in episodes:
            if id(e) not in replies:
                continue
            env_ids = self.environment_ids(is_chat, e.messages[-1], replies[id(e)])
            if len(e.ids) + len(env_ids) >= self.max_tokens:  # no room left for the policy's next turn
                e.end(truncated=True, reason="token_budget_frac")
                continue
            e.ids, e.policy = e.ids + env_ids, e.policy + [0] * len(env_ids)
            e.rewards = e.rewards + [0.0] * len(env_ids)
            e.messages.extend(replies[id(e)])
            e.stats["environment_tokens"] += len(env_ids)

    def _assemble(self, policy: Policy, episodes: list[Episode], rows: dict, n: int) -> tuple[Rollout, RolloutTexts]:
        device = policy.accelerator.device
        prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], self.tokenizer.pad_token_id)
        width = max(len(e.ids) for e in episodes)
        shape = (len(episodes), width)
        completion_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        completion_mask, policy_mask = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        turn_rewards = torch.zeros(shape, dtype=torch.float32)
        for i, e in enumerate(episodes):
            completion_ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            completion_mask[i, :len(e.ids)] = 1
            policy_mask[i, :len(e.ids)] = torch.tensor(e.policy, dtype=torch.long)
            turn_rewards[i, :len(e.ids)] = torch.tensor(e.rewards, dtype=torch.float32)
        rollout = Rollout(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
                          completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
                          truncated=torch.tensor([e.truncated for e in episodes], device=device),
                          loss_mask=policy_mask.clone().to(device), policy_mask=policy_mask.to(device),
                          turn_rewards=turn_rewards.to(device) if any(s.protocol == STEP for s in self.specs) else None)
        repeat = lambda values: [v for v in values for _ in range(n)]  # noqa: E731
        texts = RolloutTexts(prompts=[e.prompt for e in episodes], completions=[e.messages for e in episodes],
                             completion_ids=[e.ids for e in episodes],
                             columns={k: repeat(v) for k, v in rows.items() if k != "prompt"},
                             episode_stats={name: [e.stats[name] for e in episodes] for name in EPISODE_STATS},
                             environments=[e.environment for e in episodes] if self.specs else None)
        return rollout, texts

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()


def _any_process(accelerator, active: bool, synced: bool) -> bool:
    """Whether any process still has an episode going (only asked when generation is synced)."""
    if not synced:
        return active
    flag = torch.tensor([float(active)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _with_system(messages: list[dict], text: str) -> list[dict]:
    """``messages`` with ``text`` as (the start of) their system message."""
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{text}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _template_renders_tools(tokenizer, schemas: list[dict]) -> bool:
    """Whether the chat template shows the tools when given them (else the plain-text description is used)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    probe = [{"role": "user", "content": "u"}]
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=schemas, add_generation_prompt=True, tokenize=False)
        without = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects tools does not support them
        return False
    return with_tools != without and schemas[0]["function"]["name"] in with_tools
