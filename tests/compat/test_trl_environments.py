"""Our ports of TRL 1.16's documented environment code (docs/source/grpo_trainer.md, "Agent Training" >
"Environments": the environment that owns its data, "Providing an external dataset", "Rewards", "Multiple
environments"), each run for two steps on a tiny model, and the misuses TRL's API invites.

What changed in each port, and nothing else: the import lines (``from rlhf import ...``); the model id, replaced by a
tiny local model with a tool-calling chat template; ``args``, a two-step ``GRPOConfig`` in TRL's names (the
documentation's ``chat_template_kwargs={"enable_thinking": False}`` is Qwen3's switch, which this template does not
have); and bodies the documentation elides with ``...``, written out (each marked). The tiny model cannot call tools
by itself, so its turns are scripted, as TRL's own tests do (they patch ``model.generate``): ``scripted`` replaces the
sampler of the multi-turn loop, and everything after it (tool-call parsing, the environment's methods, ``reset``,
``get_reward``, rewards, the update) is the real code path.
"""

import random
import re

import pytest
import torch
from datasets import Dataset

from rlhf import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer
from rlhf.extras.tiny import TOOL_VOCAB_SIZE, char_tokenizer, tiny_model
from rlhf.metrics import StepMetrics, read_metrics
from rlhf.rewards import RewardError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Stands in for "Qwen/Qwen3-0.6B": a tiny Llama whose chat template renders tools and tool calls."""
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    tiny_model("llama", vocab_size=TOOL_VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=2,
               max_positions=1024).save_pretrained(path)
    char_tokenizer(tools=True).save_pretrained(path)
    return path


def two_steps(tmp_path, **settings):
    """The only training setting a port adds, in TRL's names: two steps of 2 prompts x 2 completions."""
    return GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=64, report_to="none", logging_steps=1, disable_tqdm=True, **settings)


def scripted(monkeypatch, reply):
    """The policy's turns: ``reply(context, row)`` (the conversation so far as text, the row in the batch) is what it
    writes, then an EOS."""

    def generate(policy, prompt_ids, prompt_mask, params, group_size=1):
        tokenizer = policy.tokenizer
        turns = []
        for i, (ids, mask) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist())):
            context = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
            turns.append(tokenizer(reply(context, i), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(len(t) for t in turns)
        assert width <= params.max_new_tokens
        completion_ids = torch.full((len(turns), width), tokenizer.pad_token_id)
        completion_mask = torch.zeros(len(turns), width, dtype=torch.long)
        for i, turn in enumerate(turns):
            completion_ids[i, :len(turn)], completion_mask[i, :len(turn)] = torch.tensor(turn), 1
        return completion_ids, completion_mask, torch.zeros(len(turns), dtype=torch.bool), None

    monkeypatch.setattr("rlhf.agent.generate", generate)


def call(name: str, **arguments) -> str:
    return "<tool_call>" + str({"name": name, "arguments": arguments}).replace("'", '"') + "</tool_call>"


def increments(context: str, i: int) -> str:
    """Calls increment once with the task's number (plus one on odd rows: half the episodes fail), then says done."""
    if "\ntool: " in context:
        return "done"
    target = int(re.search(r"counter (?:by|to) (\d+)", context).group(1))
    return call("increment", step=target + i % 2)


def prompt_text(trainer, rollout, i: int) -> str:
    ids = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
    return trainer.tokenizer.decode(ids, skip_special_tokens=False)


def last_record(tmp_path) -> dict:
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    return records[-1]


# ---------------------------------------------------------------------------------------------------- the examples
class IncrementEnv:  # the documentation's, verbatim
    # Reserved methods
    def reset(self, **kwargs) -> str | None:  # required; called at the start of each rollout
        self.counter = 0
        self.target = random.randint(1, 6)  # self-sample the task
        return f"Increment the counter by {self.target}."  # returned string becomes the prompt

    def get_reward(self) -> float:  # optional: the environment scores itself from its own state
        return float(self.counter == self.target)

    # Public methods (exposed as tools)
    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


def test_an_environment_that_owns_the_data_and_the_reward(tmp_path, model, monkeypatch):
    scripted(monkeypatch, increments)
    trainer = GRPOTrainer(
        model=model,  # was: "Qwen/Qwen3-0.6B"
        args=two_steps(tmp_path),  # was: GRPOConfig(max_steps=1000, chat_template_kwargs={"enable_thinking": False})
        environment_factory=IncrementEnv,
    )
    trainer.train()

    assert [f.name for f in trainer.reward_functions] == ["IncrementEnv"] and trainer.reward_weights == [1.0]
    assert last_record(tmp_path)["reward/IncrementEnv/mean"] == 0.5  # even rows right, odd rows one too many
    rollout, texts = trainer.make_rollout(2)
    for i, env in enumerate(texts.environments):
        # reset's string is the prompt (appended to TRL's empty user message), in the tokens the policy saw
        assert prompt_text(trainer, rollout, i).endswith(f"user: Increment the counter by {env.target}.\nassistant: ")
        assert texts.prompts[i] == [{"role": "user", "content": f"Increment the counter by {env.target}."}]
        assert env.counter == env.target + i % 2  # the tool ran once, on this episode's instance, with its argument
        assert texts.rewards["IncrementEnv"][i] == float(i % 2 == 0)  # get_reward, read from that instance
        tool_turn = rollout.completion_ids[i][(rollout.completion_mask[i] - rollout.policy_mask[i]).bool()]
        assert trainer.tokenizer.decode(tool_turn.tolist()) == f"\ntool: {env.counter}\nassistant: "
    assert "tools: increment(step)" in prompt_text(trainer, rollout, 0)  # its method, shown as a tool


class PromptEnv:  # TRL's reset-only environment (its test_train_with_environment_owned_data): it writes the prompt
    def reset(self, **kwargs) -> str:
        self.number = random.randint(1, 9)
        return f"Say the number {self.number}."


def says_the_number(completions, environments, **kwargs):
    return [float(str(env.number) in c[-1]["content"]) for c, env in zip(completions, environments)]


def test_a_reset_only_environment_writes_the_prompt_of_a_single_turn(tmp_path, model, monkeypatch):
    scripted(monkeypatch, lambda context, i: re.search(r"number (\d)", context).group(1) if i % 2 == 0 else "no")
    trainer = GRPOTrainer(model=model, reward_funcs=says_the_number, args=two_steps(tmp_path),
                          environment_factory=PromptEnv)
    trainer.train()
    assert last_record(tmp_path)["reward/says_the_number/mean"] == 0.5  # even rows say it, odd rows do not
    rollout, texts = trainer.make_rollout(2)
    for i, env in enumerate(texts.environments):
        assert prompt_text(trainer, rollout, i).endswith(f"user: Say the number {env.number}.\nassistant: ")
        assert torch.equal(rollout.completion_mask[i], rollout.policy_mask[i])  # one turn: no tool tokens
    assert "tools:" not in prompt_text(trainer, rollout, 0)


def test_an_external_dataset_reaches_reset(tmp_path, model, monkeypatch):
    scripted(monkeypatch, increments)
    # Each row carries the prompt and the task data (here, the counter target to reach).
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"Increment the counter to {i}."}] for i in range(1, 7)],
            "target": list(range(1, 7)),
        }
    )

    class IncrementEnv:
        def reset(self, target, **kwargs) -> None:  # the row's `target` column arrives as a keyword argument
            self.counter = 0
            self.target = target

        def get_reward(self) -> float:
            return float(self.counter == self.target)

        def increment(self, step: int) -> int:  # exposed as a tool (see the full docstring above)
            """
            Increment the internal counter.

            Args:
                step: Value to add to the counter.

            Returns:
                The updated counter value.
            """  # written out: the documentation points to the docstring above
            self.counter += step
            return self.counter

    trainer = GRPOTrainer(
        model=model,  # was: "Qwen/Qwen3-0.6B"
        train_dataset=dataset,  # the dataset owns the task; the "target" column reaches reset(target=...)
        environment_factory=IncrementEnv,
        args=two_steps(tmp_path),  # added: two steps
    )
    trainer.train()

    assert last_record(tmp_path)["reward/IncrementEnv/mean"] == 0.5
    rollout, texts = trainer.make_rollout(2)
    for i, env in enumerate(texts.environments):
        assert texts.prompts[i] == [{"role": "user", "content": f"Increment the counter to {env.target}."}]
        assert texts.columns["target"][i] == env.target  # reset(target=...) got its row's column
        assert env.counter == env.target + i % 2
        assert prompt_text(trainer, rollout, i).endswith(f"user: Increment the counter to {env.target}.\nassistant: ")


def test_environment_rewards_beside_reward_funcs(tmp_path, model, monkeypatch):
    scripted(monkeypatch, increments)
    seen = {}

    def format_reward(completions, **kwargs):  # trainer-owned: scores the completion text
        return [float(completion[-1]["content"] == "done") for completion in completions]  # written out: "..."

    def reward_func(environments, **kwargs):  # TRL's "reward via environments parameter"
        seen["environments"] = environments
        return [float(env.counter) for env in environments]

    trainer = GRPOTrainer(
        model=model,  # was: "Qwen/Qwen3-0.6B"
        args=two_steps(tmp_path, reward_weights=[0.5, 2.0]),  # was: GRPOConfig(max_steps=1000); weights added
        reward_funcs=[format_reward, reward_func],  # trainer-owned: scores the completion
        environment_factory=IncrementEnv,  # env-owned: scores its internal state via `get_reward`
    )
    trainer.train()

    # As in TRL: the environment's reward follows reward_funcs, under its class name, with weight 1.
    assert [f.name for f in trainer.reward_functions] == ["format_reward", "reward_func", "IncrementEnv"]
    assert trainer.reward_weights == [0.5, 2.0, 1.0]
    metrics = StepMetrics()
    rollout, texts = trainer.make_rollout(2, metrics)
    assert seen["environments"] == texts.environments  # the live instances, not copies
    total = [0.5 * f + 2.0 * c + e for f, c, e in zip(texts.rewards["format_reward"], texts.rewards["reward_func"],
                                                       texts.rewards["IncrementEnv"])]
    assert texts.rewards["IncrementEnv"] == [1.0, 0.0, 1.0, 0.0]
    assert metrics.reduce(trainer.accelerator)["reward/mean"] == pytest.approx(sum(total) / len(total))
    record = last_record(tmp_path)
    assert record["reward/format_reward/mean"] == 1.0 and record["reward/IncrementEnv/mean"] == 0.5


def test_multiple_environments_are_chosen_per_row(tmp_path, model, monkeypatch):
    called = []

    class CodingEnv:
        def reset(self, **kwargs) -> str:
            n = random.randint(1, 20)
            return f"Compute the {n}th Fibonacci number."

        def run_code(self, code: str) -> str:  # exposed as a tool only for "coding" examples
            """Run the given Python code and return its stdout.

            Args:
                code: The Python source to execute.

            Returns:
                The captured standard output.
            """
            called.append((self, "run_code", code))  # written out: "..."
            return "55"

    class GameEnv:
        def reset(self, **kwargs) -> str:
            return "Reach the goal tile."

        def move(self, action: str) -> str:  # exposed as a tool only for "game" examples
            """Apply an action to the game and return the new observation.

            Args:
                action: One of "up", "down", "left", "right".

            Returns:
                The observation after the move.
            """
            called.append((self, "move", action))  # written out: "..."
            return "goal"

    def reward_func(completions, environment, **kwargs):  # left to the reader in the documentation
        return [float(completion[-1]["content"] == "done") for completion in completions]

    def reply(context, i):  # calls whichever tool its prompt shows
        if "\ntool: " in context:
            return "done"
        return call("run_code", code="print(55)") if "run_code(code)" in context else call("move", action="up")

    scripted(monkeypatch, reply)
    # The dataset only routes: each row picks the environment for that rollout
    dataset = Dataset.from_dict({"environment": ["coding", "game"] * 500})

    trainer = GRPOTrainer(
        model=model,  # was: "Qwen/Qwen3-0.6B"
        args=two_steps(tmp_path),  # was: GRPOConfig(chat_template_kwargs={"enable_thinking": False})
        train_dataset=dataset,
        reward_funcs=reward_func,
        environment_factory={"coding": CodingEnv, "game": GameEnv},
    )
    trainer.train()

    assert last_record(tmp_path)["reward/reward_func/mean"] == 1.0
    kinds, names = {"coding": CodingEnv, "game": GameEnv}, set()
    for step in range(2, 5):
        called.clear()
        rollout, texts = trainer.make_rollout(step)
        for i, (name, env) in enumerate(zip(texts.columns["environment"], texts.environments)):
            assert type(env) is kinds[name]  # the row's factory
            shown = prompt_text(trainer, rollout, i)
            assert ("tools: run_code(code)\n" if name == "coding" else "tools: move(action)\n") in shown  # its own
            assert ("Compute the" if name == "coding" else "Reach the goal tile.") in shown  # its reset
            assert called.count((env, "run_code", "print(55)") if name == "coding" else (env, "move", "up")) == 1
            names.add(name)
        assert len(called) == len(texts.environments)
    assert names == {"coding", "game"}


def test_prompt_lengths_are_checked_with_each_rows_own_tools(tmp_path, model):
    """With a dict environment_factory a row is shown only its environment's tools, so its length is checked with
    those: a limit every row meets that way builds, though the prompts with every tool shown would exceed it."""

    class Short:
        def reset(self, **kwargs):
            return None

        def go(self, x: int) -> int:
            """Go.

            Args:
                x: A value.
            """
            return x

    class Long:
        def reset(self, **kwargs):
            return None

        def walk(self, x: int) -> int:
            """Walk.

            Args:
                x: How far.
            """
            return x

        def stay(self, y: int) -> int:
            """Stay.

            Args:
                y: How long.
            """
            return y

    factories = {"short": Short, "long": Long}
    rows = [{"prompt": [{"role": "user", "content": "Go."}], "environment": name} for name in ("short", "long")] * 2
    probe = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                        args=two_steps(tmp_path / "probe"), train_dataset=rows, environment_factory=factories)
    agent, prompts = probe.agent, [r["prompt"] for r in rows]
    texts, _ = agent.render_prompts(prompts, schemas=agent.row_schemas({"prompt": prompts,
                                                                        "environment": [r["environment"] for r in rows]}))
    own = max(len(probe.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    every = max(len(probe.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in agent.render_prompts(prompts)[0])
    assert own < every  # the control: with every tool shown, the same rows are longer
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=two_steps(tmp_path / "run", max_prompt_length=own), train_dataset=rows,
                          environment_factory=factories)
    assert trainer.agent is not None
    with pytest.raises(ValueError, match=r"longer than max_prompt_length"):
        GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                    args=two_steps(tmp_path / "short", max_prompt_length=own - 1), train_dataset=rows,
                    environment_factory=factories)


def test_the_environment_column_is_not_passed_to_reset(tmp_path, model, monkeypatch):
    """From TRL's test_train_with_multiple_environments: ``environment`` routes, the other columns reach reset."""
    scripted(monkeypatch, lambda context, i: "done")
    seen = []

    class Counter:
        def reset(self, **kwargs):
            seen.append(kwargs)

        def increment(self, step: int) -> int:
            """Add.

            Args:
                step: Value to add.
            """
            return step

    dataset = Dataset.from_dict({"environment": ["counter"] * 4, "level": [1, 2, 3, 4]})
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=two_steps(tmp_path), train_dataset=dataset, environment_factory={"counter": Counter})
    trainer.make_rollout(0)
    assert seen and all(sorted(kwargs) == ["level"] for kwargs in seen)  # neither environment nor the placeholder


# ---------------------------------------------------------------------------------------------------- misuse
class Tool:
    def reset(self, **kwargs):
        return "Go."

    def act(self, x: int) -> int:
        """Act.

        Args:
            x: A value.
        """
        return x


def test_misused_environments_fail_with_what_to_do(tmp_path, model, monkeypatch):
    scripted(monkeypatch, lambda context, i: call("act", x=1) if "\ntool: " not in context else "done")
    zero = lambda completions, **kwargs: [0.0] * len(completions)  # noqa: E731
    chat = [{"prompt": [{"role": "user", "content": "Go."}], "environment": "tool"}] * 2

    class Nothing:  # our reset(row) without our step(), and no public methods to be tools (reset(**kwargs) would be
        def reset(self, row):  # TRL's reset-only environment, tested above)
            return None

    trainer = GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path), environment_factory=Nothing)
    with pytest.raises(TypeError, match=r"environment_factory .*Nothing.* has no step\(\) method and no public "
                                        r"methods.*TRL's protocol, reset\(\*\*row\) and public methods"):
        trainer.make_rollout(0)

    routed = [dict(chat[0]), {**chat[0], "environment": "chess"}]
    with pytest.raises(ValueError, match=r"environment='chess', which is not among the environments passed to "
                                         r"environment_factory: \['tool'\]"):  # found when the prompts are checked
        GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path), train_dataset=routed,
                    environment_factory={"tool": Tool})

    class Broken(Tool):
        def get_reward(self) -> float:
            raise KeyError("score")

    trainer = GRPOTrainer(model=model, args=two_steps(tmp_path), environment_factory=Broken)
    with pytest.raises(RewardError, match=r"reward function 'Broken' raised RuntimeError: environment "
                                          r"Broken\.get_reward\(\) raised KeyError: 'score' on sample 0"):
        trainer.make_rollout(0)

    class NoReset:
        def act(self, x: int) -> int:
            """Act.

            Args:
                x: A value.
            """
            return x

    with pytest.raises(TypeError, match=r"NoReset has tool methods \['act'\] \(TRL's environment protocol\) but no "
                                        r"reset\(\) method"):
        GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path), environment_factory=NoReset)
    with pytest.raises(ValueError, match=r"dict environment_factory .* needs a train_dataset with an `environment` "
                                         r"column"):
        GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path), environment_factory={"tool": Tool})
    with pytest.raises(ValueError, match=r"No reward source.*or an environment with a get_reward\(\) method"):
        GRPOTrainer(model=model, args=two_steps(tmp_path), environment_factory=Tool)
    with pytest.raises(ValueError, match=r"reward_weights has 2 entries but there are 1 reward functions "
                                         r"\(\['<lambda>'\]\).*environment get_reward\(\) source\(s\) weigh 1"):
        GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path, reward_weights=[1.0, 1.0]),
                    environment_factory=IncrementEnv)

    def act(x: int) -> int:
        """Act.

        Args:
            x: A value.
        """
        return x

    with pytest.raises(ValueError, match=r"environment Tool's method\(s\) \['act'\] have the name of a function in "
                                         r"tools"):
        GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path), environment_factory=Tool, tools=[act])


# ---------------------------------------------------------------------------------------------------- rollout_func
def test_a_rollout_func_makes_the_completions(tmp_path, model):
    """TRL's rollout_func example (docs/source/openenv.md, "Before"), with its two outside pieces stood in for:
    ``generate_rollout_completions`` (vLLM only, and gone from TRL 1.16) samples with ``trainer.model``, and the echo
    environment's client is local."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    calls, made = [], {}

    def generate_rollout_completions(trainer, prompts):  # stands in for TRL's, with the same output
        outputs = []
        for prompt in prompts:
            prompt_ids = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                                   add_special_tokens=False)["input_ids"]
            out = trainer.model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=True,
                                         output_scores=True, return_dict_in_generate=True)
            completion_ids = out.sequences[0, len(prompt_ids):].tolist()
            logprobs = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, completion_ids)]
            outputs.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs})
        return outputs

    class Result:  # stands in for the echo environment's step result
        def __init__(self, message):
            self.reward = float(len(message))

    class client:  # noqa: N801 - stands in for EchoEnv(base_url=...)
        @staticmethod
        def step(action):
            return Result(action)

    def rollout_func(prompts, trainer):
        calls.append((prompts, trainer))  # added: what TRL passes
        outputs = generate_rollout_completions(trainer, prompts)
        env_rewards = []
        for out in outputs:
            text = tokenizer.decode(out["completion_ids"], skip_special_tokens=True)
            result = client.step(text)  # was: client.step(EchoAction(message=text))
            env_rewards.append(result.reward)
        made.update(outputs=outputs, env_rewards=env_rewards)  # added
        return {
            "prompt_ids": [out["prompt_ids"] for out in outputs],
            "completion_ids": [out["completion_ids"] for out in outputs],
            "logprobs": [out["logprobs"] for out in outputs],
            "env_reward": env_rewards,
        }

    def reward_from_env(completions, **kwargs):  # "Reward via kwargs["env_reward"]"
        return kwargs["env_reward"]

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Say {w}."}] for w in ("hi", "yo", "ok")]})
    trainer = GRPOTrainer(model=model, reward_funcs=reward_from_env, args=two_steps(tmp_path), train_dataset=dataset,
                          rollout_func=rollout_func)
    trainer.train()

    prompts, given = calls[0]
    assert given is trainer and len(prompts) == 4  # this process's prompts, one per completion, as messages
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0][0]["role"] == "user"
    last_mean = sum(made["env_rewards"]) / 4
    assert last_record(tmp_path)["reward/reward_from_env/mean"] == pytest.approx(last_mean)
    rollout, texts = trainer.make_rollout(2)
    for i, out in enumerate(made["outputs"]):
        n = len(out["completion_ids"])
        assert rollout.completion_ids[i, :n].tolist() == out["completion_ids"]  # the function's tokens are trained
        assert rollout.sampler_logprobs[i, :n].tolist() == pytest.approx(out["logprobs"])
        assert prompt_text(trainer, rollout, i) == tokenizer.decode(out["prompt_ids"], skip_special_tokens=False)
    assert texts.rewards["reward_from_env"] == made["env_rewards"]


def test_rollout_func_env_mask_and_misuse(tmp_path, model):
    dataset = [{"prompt": "a"}, {"prompt": "b"}]
    eos = 2

    def masked(prompts, trainer):  # two policy tokens, two environment tokens, an EOS
        return {"prompt_ids": [[1, 70]] * len(prompts), "completion_ids": [[40, 41, 50, 51, eos]] * len(prompts),
                "logprobs": [[-1.0] * 5] * len(prompts), "env_mask": [[1, 1, 0, 0, 1]] * len(prompts)}

    zero = lambda completions, **kwargs: [0.0] * len(completions)  # noqa: E731
    trainer = GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path), train_dataset=dataset,
                          rollout_func=masked)
    rollout, _ = trainer.make_rollout(0)
    assert rollout.policy_mask.tolist() == [[1, 1, 0, 0, 1]] * 4 and rollout.loss_mask.tolist() == [[1, 1, 0, 0, 1]] * 4
    assert not rollout.truncated.any()

    def incomplete(prompts, trainer):
        return {"prompt_ids": [[1]] * len(prompts), "completion_ids": [[40]] * len(prompts)}

    def on_vllm(prompts, trainer):
        return trainer.vllm_generation.generate(prompts)

    for fn, error, message in [(incomplete, ValueError, r"rollout_func must return keys \['logprobs'\]"),
                               (on_vllm, AttributeError, r"rollout_func used TRL's vLLM machinery .*vllm_generation")]:
        trainer = GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path), train_dataset=dataset,
                              rollout_func=fn)
        with pytest.raises(error, match=message):
            trainer.make_rollout(0)
    with pytest.raises(ValueError, match="rollout_func with tools or an environment_factory"):
        GRPOTrainer(model=model, reward_funcs=zero, args=two_steps(tmp_path), train_dataset=dataset,
                    rollout_func=masked, environment_factory=IncrementEnv)
