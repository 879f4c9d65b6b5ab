"""2-digit multiplication with a calculator tool: the tool demo's task (``make demo-tools``).

A tiny model cannot multiply two 2-digit numbers in its head (a few percent right), but it can copy them
into a calculator call and copy the result back. The warm start shows it a few conversations that use the
tool among many that answer directly; RL with a correctness reward on the final answer then has to find
out that calling the tool pays.

- ``calculator``: the tool (arithmetic on numbers, nothing else).
- ``make_splits``: disjoint train / held-out chat prompts ("37*58") with an ``answer`` column.
- ``answer_reward``: 1.0 when the last assistant message is exactly the answer.
- ``tool_conversation`` / ``direct_conversation``: the two kinds of warm-start examples.
- ``warm_start``: supervised training on conversations built exactly as a rollout builds them (the policy's
  turns learn, the tool's turns are context).
- ``heldout``: greedy multi-turn accuracy and tool-call rate, through the library's evaluation.
"""

import ast
import operator
import random

import torch
from datasets import Dataset

from rlhf.agent import AgentLoop, last_assistant_text
from rlhf.configs import RLConfig
from rlhf.distributed import make_accelerator
from rlhf.evaluation import evaluate
from rlhf.rewards import RewardFunction, correctness
from rlhf.rollout import Policy
from rlhf.tools import format_tool_call

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // %, and parentheses.

    Args:
        expression: The expression, e.g. "37*58".
    """
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"unsupported expression: {ast.unparse(node)}")

    result = value(ast.parse(expression, mode="eval").body)
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


def make_splits(num_eval: int = 300, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Every pair of 2-digit operands as a chat prompt "a*b", shuffled and split into (train, held-out)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)} for a, b in pairs]
    return Dataset.from_list(rows[num_eval:]), Dataset.from_list(rows[:num_eval])


@correctness
def answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the final assistant message (whitespace stripped) is exactly the answer, else 0.0.

    >>> answer_reward(None, [[{"role": "assistant", "content": "12"}]], answer=["12"])
    [1.0]
    """
    return [float(last_assistant_text(c).strip() == a) for c, a in zip(completions, answer)]


def tool_conversation(question: str) -> list[dict]:
    """The policy calls the calculator on the question, then answers with its result."""
    result = calculator(question)
    return [{"role": "assistant", "content": format_tool_call("calculator", {"expression": question})},
            {"role": "tool", "name": "calculator", "content": result},
            {"role": "assistant", "content": result}]


def direct_conversation(question: str) -> list[dict]:
    """The policy answers at once (what a model without the tool would have to do)."""
    return [{"role": "assistant", "content": calculator(question)}]


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
                           stop=None) -> int:
    """Supervised training on (prompt, messages) conversations built as a rollout builds them: the loss is on the
    policy's tokens only (AdamW, linear warm-up, then constant lr). Every ``check_every`` steps ``stop(step)``
    may end it. Returns the steps taken."""
    device = next(model.parameters()).device
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


def warm_start(model, agent: AgentLoop, dataset: Dataset, tool_examples: int, tool_fraction: float, max_steps: int,
               **kwargs) -> int:
    """``train_on_conversations`` on the rows of ``dataset``: the first ``tool_examples`` as tool conversations,
    repeated so that they make about ``tool_fraction`` of what is seen, the others as direct answers."""
    rows = dataset.to_list()
    tools = [(r["prompt"], tool_conversation(r["prompt"][-1]["content"])) for r in rows[:tool_examples]]
    direct = [(r["prompt"], direct_conversation(r["prompt"][-1]["content"])) for r in rows[tool_examples:]]
    repeats = max(1, round(tool_fraction * len(direct) / ((1 - tool_fraction) * max(1, len(tools)))))
    return train_on_conversations(model, agent, tools * repeats + direct, max_steps, **kwargs)


@torch.no_grad()
def heldout(model, agent: AgentLoop, dataset: Dataset, args: RLConfig) -> dict[str, float]:
    """Greedy multi-turn evaluation of ``model`` on ``dataset``: eval/accuracy, eval/agent/tool_call_rate, ...
    (``args`` gives the limits; set its eval_log_samples to 0 to write no samples file)."""
    tokenizer = agent.tokenizer
    policy = Policy(model, make_accelerator(), tokenizer, [tokenizer.eos_token_id], args.max_prompt_length)
    return evaluate(policy, dataset, [RewardFunction(answer_reward)], [1.0], args, step=0, rollout_fn=agent.rollout)
