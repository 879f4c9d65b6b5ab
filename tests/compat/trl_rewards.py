"""A reward function as TRL users keep it in their own module, named by a dotted path in trl_grpo.yaml."""


def reward_len(completions, **kwargs):
    """TRL's quick-start reward (earlier documentation): completions close to 20 characters score best."""
    contents = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [-abs(20 - len(content)) for content in contents]
