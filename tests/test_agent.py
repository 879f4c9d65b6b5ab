"""Multi-turn rollouts: only the policy's tokens learn, the sampled ids are what is scored, faults and limits
end turns cleanly, and every algorithm runs on them."""

import copy
import re

import pytest
import torch
from agent_helpers import TOOLS, Countdown, agent_trainer, chat, eos_heavy_model, train_tool_caller
from helpers import gradient, make_trainer, relative_error
from launching import run_two_process_worker

from rlhf.agent import AgentLoop, Episode, last_assistant_text
from rlhf.data import left_pad
from rlhf.distributed import make_accelerator
from rlhf.extras.tiny import EOS_ID, TOOL_VOCAB_SIZE, char_tokenizer, tiny_model
from rlhf.forward import TokenScores
from rlhf.metrics import StepMetrics
from rlhf.rollout import Rollout, RolloutTexts, SamplingParams
from rlhf.tools import format_tool_call
from rlhf.trainer.algorithms import PPO, BatchReduce, Reinforce
from rlhf.trainer.kl import KLPenalty
from rlhf.trainer.passes import rollout_logprobs
from rlhf.trainer.trainer import log_rollout
from rlhf.trainer.plan import plan_step
from rlhf.trainer.update import loss_denominators, micro_batch_loss

@pytest.fixture(scope="module")
def tool_caller():
    return train_tool_caller()


# ---------------------------------------------------------------------------------------------- masks
def two_turn_batch(tokenizer):
    """Row 0: prompt | call + EOS | tool turn | "done" + EOS; row 1: prompt | "done" + EOS. Built from the
    tokenizer by hand, not by the agent code."""
    prompt = tokenizer.apply_chat_template(chat("ok"), tools=[TOOLS[0]], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    call, env, done = encode(format_tool_call("echo", {"x": 1})) + [EOS_ID], encode("\ntool: echo 1\nassistant: "), \
        encode("done") + [EOS_ID]
    rows = [(call + env + done, [1] * len(call) + [0] * len(env) + [1] * len(done)), (done, [1] * len(done))]
    width = len(rows[0][0])
    completion_ids = torch.zeros(2, width, dtype=torch.long)
    completion_mask, policy_mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for i, (ids, policy) in enumerate(rows):
        completion_ids[i, :len(ids)], completion_mask[i, :len(ids)] = torch.tensor(ids), 1
        policy_mask[i, :len(ids)] = torch.tensor(policy)
    p_ids, p_mask = left_pad([prompt_ids, prompt_ids], tokenizer.pad_token_id)
    return Rollout(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=completion_ids, completion_mask=completion_mask,
                   truncated=torch.zeros(2, dtype=torch.bool), loss_mask=policy_mask.clone(), policy_mask=policy_mask,
                   advantages=torch.tensor([1.0, -1.0]))


def position_gradients(trainer, batch) -> torch.Tensor:
    """|d loss / d (log-prob, entropy or logits) at the position that predicts each completion token|, [B, T]: a
    zero leaf is added to the model's outputs by a forward hook."""
    leaves = []

    def hook(module, inputs, output):
        if isinstance(output, TokenScores):
            zeros = [torch.zeros_like(output.logprobs, requires_grad=True) for _ in range(2)]
            leaves.extend(zeros)
            return TokenScores(output.logprobs + zeros[0], output.entropy + zeros[1], output.cache)
        zero = torch.zeros_like(output.logits, requires_grad=True)
        leaves.append(zero)
        output.logits = output.logits + zero
        return output

    handle = trainer.unwrapped_model.register_forward_hook(hook)
    args = trainer.args
    plan = plan_step(args, 1, False)
    loss, _ = micro_batch_loss(trainer.actor, None, batch, args, plan, trainer.kl,
                               loss_denominators(batch, args, trainer.accelerator))
    loss.backward()
    handle.remove()
    width, prompt = batch.completion_ids.shape[1], batch.prompt_ids.shape[1]
    if len(leaves) == 2:  # chunked head: per position of the whole sequence
        window = slice(prompt - 1, prompt - 1 + width)
        return leaves[0].grad[:, window].abs() + leaves[1].grad[:, window].abs()
    return leaves[0].grad[:, :width].abs().sum(dim=-1)  # logits of the T + 1 last positions


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked_head", "full_logits"])
def test_environment_tokens_get_exactly_zero_gradient_and_a_naive_mask_leaks(tmp_path, chunked):
    tokenizer = char_tokenizer(tools=True)
    model = tiny_model("llama", vocab_size=TOOL_VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=2)
    trainer = make_trainer(tmp_path, model=model, tokenizer=tokenizer, kl_coef=0.1, entropy_coef=0.01,
                           share_prompt_prefix=False, chunked_lm_head=chunked, num_generations=2)
    batch = two_turn_batch(tokenizer)
    with torch.no_grad():
        current = rollout_logprobs(trainer.model, batch, plan_step(trainer.args, 1, False), 1.0)
    batch.ref_logprobs = current + torch.randn_like(current)  # a reference that disagrees everywhere
    policy, environment = batch.policy_mask.bool(), batch.completion_mask.bool() & ~batch.policy_mask.bool()
    assert environment.sum() > 10 and policy[0, -1]  # a real environment turn between two policy turns

    grads = position_gradients(trainer, batch)
    assert torch.equal(grads[environment], torch.zeros_like(grads[environment]))  # exactly zero
    assert (grads[policy] > 0).all()

    # Negative control: the naive mask, everything after the prompt, trains on the tool's tokens.
    naive = copy.copy(batch)
    naive.loss_mask = batch.completion_mask.clone()
    assert (position_gradients(trainer, naive)[environment] > 0).all()

    # Token counts: the loss denominator and the logged lengths count the policy's tokens only.
    assert loss_denominators(batch, trainer.args, trainer.accelerator)["num_tokens"] == policy.sum()
    metrics = StepMetrics()
    log_rollout(batch, RolloutTexts([], [], [], {}), trainer.accelerator, metrics)
    logged = metrics.reduce()
    assert logged["completions/mean_length"] == policy.sum().item() / 2
    assert logged["completions/mean_length"] != batch.completion_mask.sum().item() / 2


def test_kl_in_the_reward_ignores_environment_tokens(tmp_path):
    batch = two_turn_batch(char_tokenizer(tools=True))
    batch.old_logprobs = -torch.rand(batch.completion_ids.shape)
    batch.ref_logprobs = batch.old_logprobs - 5.0 * (1 - batch.policy_mask)  # huge KL on environment tokens only
    batch.ref_logprobs -= 0.1 * batch.policy_mask
    metrics = StepMetrics()
    token_rewards = KLPenalty("reward", 0.5, "k1").in_reward(torch.zeros(batch.completion_ids.shape), batch, metrics)
    environment = batch.completion_mask.bool() & ~batch.policy_mask.bool()
    assert torch.equal(token_rewards[environment], torch.zeros(int(environment.sum())))
    assert torch.allclose(token_rewards[batch.policy_mask.bool()], torch.full((int(batch.policy_mask.sum()),), -0.05))
    assert abs(metrics.reduce()["kl"] - 0.1) < 1e-6  # the mean over policy tokens; 5.0 would leak in otherwise


# ---------------------------------------------------------------------------------------------- advantages
def compacted(values, mask):
    return [[v for v, m in zip(row, mask_row) if m] for row, mask_row in zip(values.tolist(), mask.tolist())]


def reference_gae(rewards, values, gamma, lam):
    """GAE over the policy's tokens alone (environment tokens removed), a plain loop."""
    advantages, following, next_value = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        following = delta + gamma * lam * following
        advantages[t], next_value = following, values[t]
    return advantages


def test_advantages_skip_environment_tokens_and_turn_rewards_sit_on_their_turn():
    torch.manual_seed(0)
    policy = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1, 0, 0, 0, 0],
                           [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    completion = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 6 + [0] * 4])
    turn_rewards = torch.zeros(3, 10)
    turn_rewards[0, 2], turn_rewards[0, 6], turn_rewards[1, 1] = 0.5, 0.25, -1.0
    final = torch.tensor([1.0, 2.0, -1.0])
    rollout = Rollout(prompt_ids=torch.ones(3, 2, dtype=torch.long), prompt_mask=torch.ones(3, 2, dtype=torch.long),
                      completion_ids=torch.ones(3, 10, dtype=torch.long), completion_mask=completion,
                      truncated=torch.zeros(3, dtype=torch.bool), loss_mask=policy.clone(), policy_mask=policy,
                      turn_rewards=turn_rewards, old_values=torch.randn(3, 10))
    reduce = BatchReduce(make_accelerator())
    total = (final + turn_rewards.sum(dim=1)).double()  # what score_rollout hands the estimator
    no_kl = KLPenalty(None, 0.0, "k1")
    advantages, returns = PPO(gamma=0.9, lam=0.8, whiten=False).advantages(total, rollout, no_kl, reduce, StepMetrics())
    rtg, _ = Reinforce("none", 0.9, 3).advantages(total, rollout, no_kl, reduce, StepMetrics())
    environment = ~policy.bool()
    for out in (advantages, returns, rtg):
        assert torch.equal(out[environment], torch.zeros(int(environment.sum())))
    for i in range(3):
        rewards = compacted(turn_rewards, policy)[i]
        rewards[-1] += final[i].item()
        values = compacted(rollout.old_values, policy)[i]
        expected = reference_gae(rewards, values, 0.9, 0.8)
        assert torch.allclose(torch.tensor(compacted(advantages, policy)[i]), torch.tensor(expected), atol=1e-6)
        assert torch.allclose(torch.tensor(compacted(rtg, policy)[i]),
                              torch.tensor(reference_gae(rewards, [0.0] * len(rewards), 0.9, 1.0)), atol=1e-6)
    # Row 0 (policy tokens 0-2, 5-6, 9): environment tokens are not discount steps, and a turn's reward counts
    # for that turn's tokens and the earlier ones only.
    assert abs(rtg[0, 9] - 1.0) < 1e-6 and abs(rtg[0, 6] - (0.25 + 0.9)) < 1e-6
    assert abs(rtg[0, 5] - 0.9 * (0.25 + 0.9)) < 1e-6 and abs(rtg[0, 2] - (0.5 + 0.9 * rtg[0, 5])) < 1e-6
    # Negative control: GAE over every completion token (the naive mask) gives different advantages.
    naive = copy.copy(rollout)
    naive.policy_mask = None
    naive_advantages, _ = PPO(gamma=0.9, lam=0.8, whiten=False).advantages(total, naive, no_kl, reduce, StepMetrics())
    assert not torch.allclose(naive_advantages[policy.bool()], advantages[policy.bool()])


# ---------------------------------------------------------------------------------------------- exactness
def test_multi_turn_logprobs_equal_one_forward_over_the_conversation(tmp_path, tool_caller):
    """Greedy tool-calling rollouts: every policy token is the argmax of one forward over the whole conversation
    (so its id is the sampled one, in the context it was sampled in), and the trainer's scoring, with prompt
    sharing and micro-batches, gives that forward's log-probs."""
    model, tokenizer = tool_caller
    trainer = agent_trainer(tmp_path, model, tokenizer, [chat("ok"), chat("big"), chat("boom")], num_generations=2,
                            inference_batch_size=2, max_turns=3)
    rollout, texts = trainer.rollout_fn(trainer.policy, trainer.train_dataset[:3], SamplingParams(40, do_sample=False), 2)
    assert trainer.plan.share_group == 2
    assert (rollout.completion_mask.bool() & ~rollout.policy_mask.bool()).sum(dim=1).min() > 0  # tool turns in all
    scored = rollout_logprobs(trainer.model, rollout, trainer.plan, 1.0, prefix_model=trainer.unwrapped_model)
    for i in range(rollout.size):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        length = int(rollout.completion_mask[i].sum())
        ids = rollout.completion_ids[i, :length]
        with torch.no_grad():
            logits = trainer.unwrapped_model(input_ids=torch.cat([prompt, ids]).unsqueeze(0)).logits[0]
        logprobs = torch.log_softmax(logits[len(prompt) - 1:-1].float(), -1)
        policy = rollout.policy_mask[i, :length].bool()
        assert torch.equal(logprobs.argmax(-1)[policy], ids[policy])
        expected = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(scored[i, :length][policy], expected[policy], atol=1e-5)
    assert texts.completions[0][1] == {"role": "tool", "name": "echo", "content": "echo 1"}
    assert [m["role"] for m in texts.completions[0]] == ["assistant", "tool", "assistant"]


def test_gradient_of_a_multi_turn_batch_is_the_same_for_every_micro_batch_and_prompt_sharing(tmp_path):
    model = eos_heavy_model()
    base = dict(tools=None, environment_factory=Countdown, reward=None, num_generations=4, temperature=1.0,
                max_new_tokens=6, max_turns=3)
    reference = agent_trainer(tmp_path / "a", model, char_tokenizer(), ["1+2=", "3+4="], micro_batch_size=8,
                              share_prompt_prefix=False, **base)
    batch, _ = reference.make_rollout(0)
    assert batch.turn_rewards.sum() > 0 and (batch.policy_mask != batch.completion_mask).any()
    expected = gradient(reference, batch)
    for micro, share in [(4, True), (2, False), (8, True)]:
        other = agent_trainer(tmp_path / f"{micro}{share}", model, char_tokenizer(), ["1+2=", "3+4="],
                              micro_batch_size=micro, share_prompt_prefix=share, **base)
        assert relative_error(gradient(other, batch), expected) < 1e-5


# ---------------------------------------------------------------------------------------------- faults and limits
def test_a_tool_that_raises_hangs_or_floods_never_stops_the_run(tmp_path, tool_caller):
    model, tokenizer = tool_caller
    prompts = [chat("boom"), chat("nap"), chat("big"), chat("ok")]
    trainer = agent_trainer(tmp_path, model, tokenizer, prompts, max_steps=2, logging_steps=1)
    rollout, texts = trainer.make_rollout(0)
    replies = {m["content"] for c in texts.completions for m in c if m["role"] == "tool"}
    assert "echo 1" in replies
    assert any(r.startswith("Error: RuntimeError: boom 1") for r in replies)
    assert any(r.startswith("Error: nap did not return within 1 s") for r in replies)
    assert any(r.startswith("zzz") and r.endswith("more characters cut]") for r in replies)
    assert all(len(r) <= 60 for r in replies)
    # The model sees exactly these messages: they are in the tokens after its call.
    boom_row = next(i for i, c in enumerate(texts.completions) if "boom" in c[1]["content"])
    environment_text = tokenizer.decode(rollout.completion_ids[boom_row][
        (rollout.completion_mask[boom_row] - rollout.policy_mask[boom_row]).bool()])
    assert "tool: Error: RuntimeError: boom 1" in environment_text
    assert [last_assistant_text(c) for c in texts.completions] == ["done"] * 8

    records = trainer.train().records
    for record in records:
        assert record["agent/tool_call_rate"] == 1.0
        assert record["agent/tool_errors"] == record["agent/tool_timeouts"] == record["agent/tool_long_results"] == 0.25
        assert torch.isfinite(torch.tensor(record["loss/policy"]))
    assert trainer.step == 2


def test_max_turns_ends_a_trajectory_cleanly_and_marks_it_truncated(tmp_path, tool_caller):
    """With one turn allowed, the policy's tool call is the end: not run, the trajectory truncated."""
    model, tokenizer = tool_caller
    trainer = agent_trainer(tmp_path, model, tokenizer, [chat("ok")], max_turns=1)
    rollout, texts = trainer.make_rollout(0)
    assert rollout.truncated.all() and texts.episode_stats["max_turns_frac"] == [1.0, 1.0]
    assert texts.episode_stats["turns"] == texts.episode_stats["tool_calls"] == [1.0, 1.0]
    for i, completion in enumerate(texts.completions):
        assert [m["role"] for m in completion] == ["assistant"]
        assert completion[0]["tool_calls"][0]["function"]["name"] == "echo"  # called, never run
        length = int(rollout.completion_mask[i].sum())
        assert rollout.completion_ids[i, length - 1] == EOS_ID and rollout.policy_mask[i, :length].all()
    records = agent_trainer(tmp_path / "run", model, tokenizer, [chat("ok")], max_turns=1).train().records
    assert records[-1]["completions/truncated_frac"] == 1.0 and records[-1]["agent/max_turns_frac"] == 1.0


def test_the_token_budget_ends_a_trajectory_cleanly_and_marks_it_truncated(tmp_path, tool_caller):
    model, tokenizer = tool_caller
    probe = agent_trainer(tmp_path / "probe", model, tokenizer, [chat("ok")])
    rollout, _ = probe.make_rollout(0)
    policy = rollout.policy_mask[0].tolist()
    call = policy.index(0)  # the call, up to its EOS
    tool_turn = policy.index(1, call) - call
    assert sum(policy[call + tool_turn:]) == 5  # "done" + EOS
    # A budget that cuts the final answer after 2 tokens; one where the tool's answer does not fit.
    for budget, roles, length in [(call + tool_turn + 2, ["assistant", "tool", "assistant"], call + tool_turn + 2),
                                  (call + 3, ["assistant"], call)]:
        trainer = agent_trainer(tmp_path / str(budget), model, tokenizer, [chat("ok")], max_trajectory_tokens=budget)
        rollout, texts = trainer.make_rollout(0)
        lengths = rollout.completion_mask.sum(dim=1)
        assert rollout.truncated.all() and texts.episode_stats["token_budget_frac"] == [1.0, 1.0]
        assert lengths.tolist() == [length] * 2
        assert all([m["role"] for m in c] == roles for c in texts.completions)  # no half-appended tool turn
        assert all(rollout.policy_mask[i, lengths[i] - 1] == 1 for i in range(2))  # ends on a policy token
    assert texts.completions[0][0]["content"].startswith("<tool_call>")


def test_environments_give_per_turn_rewards_and_stop_at_max_turns(tmp_path):
    trainer = agent_trainer(tmp_path, eos_heavy_model(), char_tokenizer(), ["1+2=", "3+4="], tools=None,
                            environment_factory=lambda: Countdown(turns=5), reward=None, max_new_tokens=6,
                            max_turns=3, temperature=1.0)
    rollout, texts = trainer.make_rollout(0)
    stopped = 0
    for i, completion in enumerate(texts.completions):
        turns = int(texts.episode_stats["turns"][i])
        assert [m["role"] for m in completion] == (["assistant", "observation"] * turns)[:2 * turns - 1]
        assert rollout.truncated[i]  # the countdown outlasts max_turns, or a turn ran out of tokens
        if texts.episode_stats["max_turns_frac"][i] == 1.0:
            stopped += 1
            assert turns == 3
            # Each turn's 0.5 sits on that turn's last policy token, the last one's included.
            policy = rollout.policy_mask[i].bool()
            last_tokens = policy & ~torch.cat([policy[1:], torch.tensor([False])])
            assert torch.equal(rollout.turn_rewards[i][last_tokens], torch.full((3,), 0.5))
            assert rollout.turn_rewards[i].sum() == 1.5
    assert stopped > 0


def test_environment_errors_name_the_environment(tmp_path):
    class Broken:
        def reset(self, row):
            return None

        def step(self, text):
            return "just an observation"

    trainer = agent_trainer(tmp_path, eos_heavy_model(), char_tokenizer(), ["1+2="], tools=None,
                            environment_factory=Broken, reward=None, max_new_tokens=6, temperature=1.0)
    with pytest.raises(TypeError, match=r"environment Broken\.step must return \(observation or None"):
        for step in range(5):  # a turn that ends without an EOS never reaches step(); some will
            trainer.make_rollout(step)


def test_malformed_calls_become_messages_the_model_sees_and_are_counted():
    """Whatever the policy writes between <tool_call> tags, the episode goes on with an error message per call."""
    agent = AgentLoop(char_tokenizer(tools=True), TOOLS, max_turns=3, max_tokens=10_000, tool_timeout=1,
                      max_tool_response_chars=80, tool_workers=0)
    turns = {"not JSON": "<tool_call>{echo 1}</tool_call>",
             "no arguments object": '<tool_call>{"name": "echo", "arguments": 3}</tool_call>',
             "unknown tool": '<tool_call>{"name": "rm", "arguments": {"x": 1}}</tool_call>',
             "wrong argument": '<tool_call>{"name": "echo", "arguments": {"y": 1}}</tool_call>',
             "unclosed": '<tool_call>{"name": "echo", "arguments": {"x": 1}}',
             "one good, one bad": format_tool_call("echo", {"x": 1}) + "<tool_call>[]</tool_call>"}
    episodes = [Episode(chat("hi"), messages=[{"role": "assistant", "content": text}], raw_turn=text)
                for text in turns.values()]
    agent._respond(episodes, is_chat=True, turns_left=True)
    wanted = {"not JSON": ["not valid JSON"], "no arguments object": ['"arguments"'],
              "unknown tool": ["unknown tool 'rm'"],
              "wrong argument": ["missing a required argument: 'x'"], "unclosed": ["not closed"],
              "one good, one bad": ["echo 1", '"arguments"']}
    for (case, e), expected in zip(zip(turns, episodes), wanted.values()):
        assert not e.done, case
        replies = [m["content"] for m in e.messages[1:]]
        assert [m["role"] for m in e.messages[1:]] == ["tool"] * len(expected), case
        assert all(want in reply for want, reply in zip(expected, replies)), (case, replies)
        assert all(len(r) <= 80 for r in replies)
        assert e.stats["tool_bad_calls"] == sum(r.startswith("Error:") for r in replies), case
        assert e.stats["environment_tokens"] == len(e.ids) > 0  # the messages are in the tokens


def test_misused_tools_and_environments_fail_at_once_with_what_to_do(tmp_path):
    tokenizer = char_tokenizer(tools=True)
    limits = dict(max_turns=2, max_tokens=64, tool_timeout=1, max_tool_response_chars=50, tool_workers=0)

    def unhinted(x):
        """Echo.

        Args:
            x: A number.
        """
        return x

    with pytest.raises(ValueError, match="tool 'unhinted'.*type hint"):
        AgentLoop(tokenizer, [unhinted], **limits)
    with pytest.raises(TypeError, match="tools must be functions"):
        AgentLoop(tokenizer, ["rlhf.extras.calculator:calc"], **limits)
    with pytest.raises(ValueError, match="needs tools, an environment_factory"):
        AgentLoop(tokenizer, [], **limits)
    with pytest.raises(TypeError, match="environment_factory must be callable"):
        AgentLoop(tokenizer, None, Countdown(), **limits)  # an instance, not the class

    class NoStep:
        def reset(self, row):
            return None

    for factory, missing in [(NoStep, "step()"), (lambda: "an environment", "reset() or step()")]:
        trainer = agent_trainer(tmp_path, eos_heavy_model(), char_tokenizer(), ["1+2="], tools=None,
                                environment_factory=factory, reward=None, max_new_tokens=6)
        with pytest.raises(TypeError, match=rf"environment_factory .* has no {re.escape(missing)} method"):
            trainer.make_rollout(0)

    class RaisesOnReset(Countdown):
        def reset(self, row):
            raise KeyError("level")

    trainer = agent_trainer(tmp_path, eos_heavy_model(), char_tokenizer(), ["1+2="], tools=None,
                            environment_factory=RaisesOnReset, reward=None, max_new_tokens=6)
    with pytest.raises(RuntimeError, match=r"environment RaisesOnReset\.reset raised KeyError"):
        trainer.make_rollout(0)


# ---------------------------------------------------------------------------------------------- algorithms
@pytest.mark.parametrize("algo,overrides", [("grpo", {}), ("ppo", {"num_generations": 2}),
                                            ("reinforce", {"baseline": "rloo"}),
                                            ("reinforce", {"baseline": "reinforce++", "kl_coef": 0.1})])
def test_every_algorithm_trains_on_multi_turn_rollouts(tmp_path, algo, overrides):
    settings = dict(tools=None, environment_factory=Countdown, reward=None, num_generations=4, max_new_tokens=6,
                    max_turns=3, temperature=1.0)
    settings.update(overrides)
    trainer = agent_trainer(tmp_path, eos_heavy_model(), char_tokenizer(), ["1+2=", "3+4="], algo=algo, **settings)
    rollout, _ = trainer.make_rollout(0)
    environment = (rollout.completion_mask - rollout.policy_mask).bool()
    assert environment.any()
    if rollout.advantages.dim() == 2:  # token-level estimators: nothing on environment tokens
        assert torch.equal(rollout.advantages[environment], torch.zeros(int(environment.sum())))
    else:  # GRPO: one advantage per trajectory; the trajectories of one prompt form its group
        assert rollout.advantages.view(2, 4).sum(dim=1).abs().max() < 1e-5
    if algo == "ppo":
        assert torch.equal(rollout.returns[environment], torch.zeros(int(environment.sum())))
    out = trainer.training_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values()), out
    assert out["reward/environment/mean"] > 0


# ---------------------------------------------------------------------------------------------- rendering
def test_plain_text_tool_format_for_templates_and_prompts_without_tool_support():
    tokenizer = char_tokenizer()  # its template ignores tools
    agent = AgentLoop(tokenizer, TOOLS, max_turns=2, max_tokens=64, tool_timeout=1, max_tool_response_chars=50,
                      tool_workers=0)
    assert not agent.template_tools
    (text,), is_chat = agent.render_prompts([chat("hi")])
    assert is_chat and text.startswith("<bos>system: You can call these tools.") and '"name": "echo"' in text
    assert text.endswith("user: hi\nassistant: ")
    tool_turn = [{"role": "tool", "name": "echo", "content": "echo 1"}]
    assert tokenizer.decode(agent.environment_ids(True, {}, tool_turn)) == "\ntool: echo 1\nassistant: "
    (text,), is_chat = agent.render_prompts(["2+2="])
    assert not is_chat and text.startswith("You can call these tools.") and text.endswith("\n\n2+2=")
    assert (tokenizer.decode(agent.environment_ids(False, {}, tool_turn))
            == "\n<tool_response>\necho 1\n</tool_response>\n")


def test_tool_turns_follow_the_chat_template():
    """With a template that renders tools, the ids of a conversation built turn by turn are the template's
    rendering of the whole conversation (the template is prefix-preserving)."""
    tokenizer = char_tokenizer(tools=True)
    agent = AgentLoop(tokenizer, TOOLS, max_turns=2, max_tokens=64, tool_timeout=1, max_tool_response_chars=50,
                      tool_workers=0)
    assert agent.template_tools
    call = {"type": "function", "function": {"name": "echo", "arguments": {"x": 1}}}
    messages = [{"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "echo", "content": "echo 1"}, {"role": "assistant", "content": "done"}]
    whole = tokenizer.apply_chat_template(chat("ok") + messages, tools=TOOLS, tokenize=False)
    turn_by_turn = [{"role": "assistant", "content": format_tool_call("echo", {"x": 1}).replace(":", ": ").replace(
        ",", ", ")}] + messages[1:]
    prompt_ids, ids, policy = agent.conversation_ids(chat("ok"), turn_by_turn)
    assert tokenizer.decode(prompt_ids + ids) + "\n" == whole
    assert tokenizer.decode([t for t, p in zip(ids, policy) if not p]) == "\ntool: echo 1\nassistant: "


# ---------------------------------------------------------------------------------------------- processes
def test_two_processes_match_one_on_multi_turn_rollouts(tmp_path):
    """Each process runs its own episodes (different numbers of turns); the gathered batch's gradient on one
    process equals the two processes' gradient, and each prompt's trajectories stay one group."""
    from agent_multiproc_worker import PROMPTS, SETTINGS
    run_two_process_worker("agent_multiproc_worker.py", str(tmp_path))
    out = torch.load(tmp_path / "result.pt", weights_only=True)
    assert out["world_size"] == 2 and len(set(out["turns"])) > 1
    batch = Rollout(**out["batch"])
    assert (batch.policy_mask != batch.completion_mask).any() and batch.turn_rewards.sum() > 0
    assert batch.advantages.view(4, 4).sum(dim=1).abs().max() < 1e-5
    single = agent_trainer(tmp_path / "single", eos_heavy_model(), char_tokenizer(), PROMPTS, **SETTINGS)
    assert relative_error(out["grad"], gradient(single, batch)) < 1e-5
