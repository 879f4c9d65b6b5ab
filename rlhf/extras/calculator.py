"""2-digit multiplication with a calculator tool: the tool demo's task (``make demo-tools``).

A tiny model cannot multiply two 2-digit numbers in its head (a few percent right), but it can copy them
into a calculator call and copy the result back. The warm start shows it a few conversations that use the
tool among many that answer directly; RL with a correctness reward on the final answer then has to find
out that calling the tool pays.

- ``calc``: the calculator tool (arithmetic on numbers, nothing else).
- ``make_splits``: disjoint train / held-out chat prompts ("37*58") with an ``answer`` column.
- ``answer_reward``: 1.0 when the last assistant message is exactly the answer.
- ``tool_conversation`` / ``direct_conversation``: the two kinds of warm-start examples.
- ``warm_start``: supervised training on conversations built exactly as a rollout builds them (the policy's
  turns learn, the tool's turns are context), until ``tool_use_skill`` says the model can use the tool.
"""

import ast
import operator
import random

import torch
from datasets import Dataset

from rlhf.agent import AgentLoop, last_assistant_text
from rlhf.rewards import correctness
from rlhf.tools import OPEN_TAG, format_tool_call

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calc(expr: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // %, and parentheses.

    Args:
        expr: The expression, e.g. "37*58".
    """
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"unsupported expression: {ast.unparse(node)}")

    result = value(ast.parse(expr, mode="eval").body)
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


def make_splits(num_eval: int = 300, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Every pair of 2-digit operands as a chat prompt "a*b", shuffled and split into (train, held-out)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)} for a, b in pairs]
    return Dataset.from_list(rows[num_eval:]), Dataset.from_list(rows[:num_eval])


def train_split() -> Dataset:
    """The default training prompts (for recipes: ``dataset_name: rlhf.extras.calculator:train_split``)."""
    return make_splits()[0]


def eval_split() -> Dataset:
    """The default held-out prompts, disjoint from ``train_split``."""
    return make_splits()[1]


@correctness
def answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the final assistant message (whitespace stripped) is exactly the answer, else 0.0.

    >>> answer_reward(None, [[{"role": "assistant", "content": "12"}]], answer=["12"])
    [1.0]
    """
    return [float(last_assistant_text(c).strip() == a) for c, a in zip(completions, answer)]


def tool_conversation(question: str) -> list[dict]:
    """The policy calls the calculator on the question, then answers with its result."""
    result = calc(question)
    return [{"role": "assistant", "content": format_tool_call("calc", {"expr": question})},
            {"role": "tool", "name": "calc", "content": result},
            {"role": "assistant", "content": result}]


def direct_conversation(question: str) -> list[dict]:
    """The policy answers at once (what a model without the tool would have to do)."""
    return [{"role": "assistant", "content": calc(question)}]


def _sft_batch(encoded: list[tuple], pad_id: int, device):
    """Right-padded prompt + conversation ids from ``AgentLoop.conversation_ids`` triples; labels only on the
    policy's tokens."""
    width = max(len(p) + len(ids) for p, ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (prompt_ids, turn_ids, policy) in enumerate(encoded):
        n = len(prompt_ids) + len(turn_ids)
        ids[i, :n], attention[i, :n] = torch.tensor(prompt_ids + turn_ids), 1
        labels[i, len(prompt_ids):n] = torch.where(torch.tensor(policy).bool(), torch.tensor(turn_ids), -100)
    return ids.to(device), attention.to(device), labels.to(device)


def train_on_conversations(model, agent: AgentLoop, examples: list[tuple], max_steps: int, batch_size: int = 64,
                           lr: float = 3e-3, warmup_steps: int = 30, seed: int = 0, check_every: int = 25,
                           stop=None, optimizer=None) -> int:
    """Supervised training on (prompt, messages) conversations built as a rollout builds them: the loss is on the
    policy's tokens only (AdamW, linear warm-up, then constant lr; pass the ``optimizer`` of an earlier call to
    continue with its moments). Every ``check_every`` steps ``stop(step)`` may end it. Returns the steps taken."""
    device = next(model.parameters()).device
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    rng = random.Random(seed)
    encoded = {}  # example index -> its ids, built on first use
    step = 0
    for step in range(1, max_steps + 1):
        model.train()
        batch = [rng.randrange(len(examples)) for _ in range(batch_size)]
        for i in batch:
            if i not in encoded:
                encoded[i] = agent.conversation_ids(*examples[i])
        ids, attention, labels = _sft_batch([encoded[i] for i in batch], agent.tokenizer.pad_token_id, device)
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if stop is not None and step % check_every == 0 and stop(step):
            break
    model.eval()
    return step


@torch.no_grad()
def tool_use_skill(model, agent: AgentLoop, prompts: list) -> float:
    """How well the model uses the tool once it has opened a call: the probability, averaged over ``prompts``, of
    sampling (at temperature 1) the rest of the tool conversation exactly: the question copied into the call, then
    the tool's result copied into the answer. (Whether it opens a call at all is left out: that is the choice RL
    is to change.) Argmax-right is not enough: a call is ~45 tokens, so 0.95 per token samples right 10% of the
    time and RL sees nothing but bad calls."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for prompt in prompts:
        prompt_ids, ids, policy = agent.conversation_ids(prompt, tool_conversation(prompt[-1]["content"]))
        logits = model(input_ids=torch.tensor([prompt_ids + ids], device=device)).logits[0, len(prompt_ids) - 1:-1]
        logprobs = logits.float().log_softmax(-1).cpu().gather(1, torch.tensor(ids)[:, None])[:, 0]
        total += logprobs[1:][torch.tensor(policy[1:], dtype=torch.bool)].sum().exp().item()
    model.train(was_training)
    return total / max(1, len(prompts))


@torch.no_grad()
def tool_call_probability(model, agent: AgentLoop, prompts: list) -> float:
    """The mean probability, over ``prompts``, that the model's reply opens with a tool call: the probability of the
    opening tag's tokens, teacher-forced (one token where the tokenizer has the tag as a special token; several where
    it has not, as SmolLM2's, whose ``<tool_call>`` is 5 ordinary tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    opener = agent.tokenizer.encode(OPEN_TAG, add_special_tokens=False)
    total = 0.0
    for prompt in prompts:
        prompt_ids = agent.conversation_ids(prompt, [])[0]
        ids = torch.tensor([prompt_ids + opener[:-1]], device=device)
        logprobs = model(input_ids=ids).logits[0, len(prompt_ids) - 1:].float().log_softmax(-1)
        total += logprobs.gather(-1, torch.tensor(opener, device=device).unsqueeze(-1)).sum().exp().item()
    model.train(was_training)
    return total / max(1, len(prompts))


def warm_start(model, agent: AgentLoop, dataset: Dataset, tool_examples: int, tool_fraction: float, max_steps: int,
               skill: float | None = None, call_probability: float | None = None, settle_fraction: float = 0.1,
               settle_lr: float = 1e-3, anneal_at: float = 0.3, probes: int = 50, log=None, **kwargs) -> int:
    """``train_on_conversations`` on the rows of ``dataset``: the first ``tool_examples`` as tool conversations,
    repeated so that they make about ``tool_fraction`` of what is seen, the others as direct answers.

    With ``skill``, it stops early once ``tool_use_skill`` on ``probes`` prompts it trains on only as direct
    answers reaches that (the copying is learnt suddenly, after a few hundred steps that vary with the seed);
    once it reaches ``anneal_at`` the lr drops to ``settle_lr`` (at 3e-3 the skill rose to 0.7 and fell back).
    With ``call_probability``, training goes on with tool conversations making only ``settle_fraction`` of what is
    seen, at ``settle_lr``, with the same optimizer (checked every 5 steps, at most 300 steps), until
    ``tool_call_probability`` is at most that: the model can use the tool but seldom does, and greedy decoding
    does not. (Direct answers alone, even for 5 steps, undid the copying just learnt.) ``log(phase, step,
    value)`` sees each check. Returns the steps taken."""
    rows = dataset.to_list()
    tools = [(r["prompt"], tool_conversation(r["prompt"][-1]["content"])) for r in rows[:tool_examples]]
    direct = [(r["prompt"], direct_conversation(r["prompt"][-1]["content"])) for r in rows[tool_examples:]]
    repeats = max(1, round(tool_fraction * len(direct) / ((1 - tool_fraction) * max(1, len(tools)))))
    held = [r["prompt"] for r in rows[tool_examples:tool_examples + probes]]

    def check(phase, measure, done):
        def stop(step):
            value = measure(model, agent, held)
            if log is not None:
                log(phase, step, value)
            return done(value)
        return stop

    optimizer = torch.optim.AdamW(model.parameters(), lr=kwargs.pop("lr", 3e-3), betas=(0.9, 0.98), weight_decay=0.0)

    def reached(value):
        if value >= anneal_at:  # the copying has appeared: a lower lr keeps it (at 3e-3 it came and went)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] = settle_lr
        return value >= skill

    stop = check("skill", tool_use_skill, reached) if skill is not None else None
    steps = train_on_conversations(model, agent, tools * repeats + direct, max_steps, stop=stop, optimizer=optimizer,
                                   **kwargs)
    if call_probability is not None and tool_call_probability(model, agent, held) > call_probability:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = settle_lr
        fewer = max(1, round(settle_fraction * len(direct) / ((1 - settle_fraction) * max(1, len(tools)))))
        settle = {**kwargs, "warmup_steps": 1, "check_every": 5, "optimizer": optimizer,
                  "stop": check("calls", tool_call_probability, lambda v: v <= call_probability)}
        steps += train_on_conversations(model, agent, tools * fewer + direct, 300, **settle)
        if log is not None:
            log("skill", steps, tool_use_skill(model, agent, held))
    return steps
