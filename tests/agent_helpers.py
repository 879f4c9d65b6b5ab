"""Shared by the multi-turn tests: tools with known faults, environments, and a tiny model taught to call tools.

``train_tool_caller`` trains a tiny Llama (supervised steps on fixed conversations, with the tool-aware
character tokenizer): asked "ok", "boom", "nap" or "big", it calls the tool of that name (echo for "ok")
and, once the tool has answered, says "done". It samples real tool calls, so the tests exercise parsing,
execution and continuation end to end.
"""

import copy
import time

import torch

from rlhf import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, ReinforceConfig, ReinforceTrainer
from rlhf.agent import AgentLoop, last_assistant_text
from rlhf.extras.calculator import train_on_conversations
from rlhf.extras.tiny import EOS_ID, TOOL_VOCAB_SIZE, char_tokenizer, tiny_model
from rlhf.tools import format_tool_call


def echo(x: int) -> str:
    """Say the number back.

    Args:
        x: A number.
    """
    return f"echo {x}"


def boom(x: int) -> str:
    """Raise.

    Args:
        x: A number.
    """
    raise RuntimeError(f"boom {x}")


def nap(x: int) -> str:
    """Never return.

    Args:
        x: A number.
    """
    while True:
        time.sleep(0.05)


def big(x: int) -> str:
    """Return a million characters.

    Args:
        x: A number.
    """
    return "z" * 1_000_000


TOOLS = [echo, boom, nap, big]
CALLS = {"ok": "echo", "boom": "boom", "nap": "nap", "big": "big"}


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def conversation(prompt: str, answer: str) -> list[dict]:
    """The policy's call for ``prompt``, the tool's ``answer``, and the policy's "done"."""
    name = CALLS[prompt]
    return [{"role": "assistant", "content": format_tool_call(name, {"x": 1})},
            {"role": "tool", "name": name, "content": answer}, {"role": "assistant", "content": "done"}]


def train_tool_caller(seed: int = 0):
    """(model, tokenizer): greedy decoding follows the conversations above."""
    tokenizer = char_tokenizer(tools=True)
    agent = AgentLoop(tokenizer, TOOLS, max_turns=2, max_tokens=256, tool_timeout=1.0, max_tool_response_chars=60,
                      tool_workers=0)
    replies = ["echo 1", "Error: RuntimeError: boom 1", "Error: nap did not return within 1 s and was stopped.",
               "zzzzzzzzzz... [999976 more characters cut]", "12"]
    examples = [(chat(p), conversation(p, r)) for p in CALLS for r in replies]
    model = tiny_model("llama", vocab_size=TOOL_VOCAB_SIZE, hidden_size=64, num_layers=2, num_heads=4,
                       max_positions=256, seed=seed)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and much faster on a busy machine
    try:
        steps = train_on_conversations(model, agent, examples, max_steps=600, batch_size=16, lr=5e-3, warmup_steps=10,
                                       seed=seed, check_every=20, stop=lambda step: _follows_script(model, agent))
    finally:
        torch.set_num_threads(threads)
    assert _follows_script(model, agent), f"the tool caller did not learn its script in {steps} steps"
    return model, tokenizer


@torch.no_grad()
def _follows_script(model, agent) -> bool:
    for prompt in CALLS:
        prompt_ids, ids, policy = agent.conversation_ids(chat(prompt), conversation(prompt, "echo 1"))
        sequence = torch.tensor([prompt_ids + ids])
        predicted = model(input_ids=sequence).logits[0, len(prompt_ids) - 1:-1].argmax(-1)
        wanted = torch.tensor(ids)
        if not bool((predicted == wanted)[torch.tensor(policy).bool()].all()):
            return False
    return True


def final_is_done(prompts, completions, **kwargs):
    return [float(last_assistant_text(c) == "done") for c in completions]


class Countdown:
    """An environment that answers every policy turn with "left: k" for ``turns`` turns, then ends; reward 0.5
    per turn and 1.0 at the end, so per-turn and final rewards are both in play."""

    def __init__(self, turns: int = 2):
        self.turns = turns

    def reset(self, row):
        self.left = self.turns
        return None

    def step(self, text):
        if self.left == 0:
            return None, 1.0
        self.left -= 1
        return f"left: {self.left}", 0.5


def eos_heavy_model(seed: int = 0, vocab_size: int | None = None):
    """A random tiny Llama whose EOS list holds a third of the vocabulary: its turns end after a few tokens, so
    environments get several turns without any training."""
    kwargs = {"vocab_size": vocab_size} if vocab_size else {}
    model = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, max_positions=512, seed=seed, **kwargs)
    model.generation_config.eos_token_id = [EOS_ID, *range(40, 100, 3)]
    return model


CONFIGS = {"grpo": (GRPOConfig, GRPOTrainer), "ppo": (PPOConfig, PPOTrainer),
           "reinforce": (ReinforceConfig, ReinforceTrainer)}


def agent_trainer(tmp_path, model, tokenizer, prompts, algo="grpo", reward=final_is_done, tools=TOOLS,
                  environment_factory=None, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=1, prompts_per_step=len(prompts), num_generations=2,
                    max_new_tokens=40, micro_batch_size=16, learning_rate=1e-3, disable_tqdm=True, seed=0,
                    write_report=False, max_turns=4, max_trajectory_tokens=300, max_prompt_length=64, tool_timeout=1.0,
                    max_tool_response_chars=60, tool_workers=2, temperature=0.3)
    settings.update(overrides)
    config_class, trainer_class = CONFIGS[algo]
    return trainer_class(copy.deepcopy(model), [reward] if reward else [], args=config_class(**settings),
                         train_dataset=[{"prompt": p} for p in prompts], processing_class=tokenizer, tools=tools,
                         environment_factory=environment_factory)
