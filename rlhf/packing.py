"""Prompt trees packed into rows: the forward passes compute no padding.

The plain layout of a batch is [rows, prompt width + longest completion]: with natural EOS, completions of one
batch differ several-fold in length, and every row pays for the longest. Here each group of rows that share a
prompt becomes a tree, its prompt once (the trunk) and each completion a branch that attends to the trunk and to
itself, and trees are packed side by side into rows with a 4D attention mask that keeps them apart. Every real
token is computed once (the prompt once per group), nothing else is, and positions are those of the plain layout,
so the outputs are those of running every row whole (tests/test_packing.py pins log-probs, entropies, values and
gradients against it).

A branch is [last prompt token, completion tokens but the last]: its position t predicts completion token t, so
every position predicts at most one token and the scoring path's one-target-per-position contract holds (the last
prompt token is repeated once per branch, G - 1 extra tokens per group).

Only where a custom 4D mask is all that mixes tokens (``packable``): attention implementations that take one
(``sdpa``, ``eager``; not flash attention or flex), decoders whose every layer is attention (``PURE_ATTENTION``:
a recurrent or convolutional layer, as in Mamba-style hybrids, would carry state from one packed tree into the next),
and no sliding window shorter than the plain layout (the custom mask replaces the window). Others keep the plain
layout.
"""

from dataclasses import dataclass

import torch

# Trees are packed into rows of at most this many tokens, or of the plain layout's width when that is wider; a
# larger tree is split into sub-trees, each with its own copy of the trunk. Bounds the [L, L] mask and the
# attention work a packed row adds over the plain layout.
ROW_TOKENS = 2048

ENABLED = True  # the lever's switch, for A/B measurements (bench/levers.py); the outputs do not depend on it

# Packing is used when it computes at most this fraction of the plain layout's tokens: near-equal lengths (EOS
# suppressed) gain nothing, and the 4D mask costs more than the causal flag.
MAX_FRACTION = 0.8


@dataclass
class PackedRows:
    """A batch laid out as packed trees. R rows of L tokens; B rows and T completion columns in the plain layout."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L] the plain layout's positions
    tree: torch.Tensor  # [R, L] which tree a token belongs to (-1: padding)
    branch: torch.Tensor  # [R, L] which plain row's branch (-1: the trunk, or padding)
    targets: torch.Tensor  # [R, L] the completion token a position predicts (-1: none)
    index: torch.Tensor  # [B, T] the flat position (into R * L) that predicts completion token (b, t)
    valid: torch.Tensor  # [B, T] bool: the completion mask

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """[R, 1, L, L]: a token attends to earlier tokens of its own tree's trunk and of its own branch; padding
        attends to itself only (a query with nothing to attend to gives NaN). Boolean for ``sdpa`` (True: attend),
        additive (0 or the dtype's minimum) for ``eager``."""
        length = self.tree.shape[1]
        real = self.tree >= 0
        same_tree = self.tree.unsqueeze(2) == self.tree.unsqueeze(1)
        visible_branch = (self.branch.unsqueeze(1) < 0) | (self.branch.unsqueeze(2) == self.branch.unsqueeze(1))
        causal = torch.ones(length, length, dtype=torch.bool, device=self.tree.device).tril()
        allowed = same_tree & visible_branch & causal & real.unsqueeze(1) & real.unsqueeze(2)
        allowed |= torch.eye(length, dtype=torch.bool, device=self.tree.device) & ~real.unsqueeze(2)
        allowed = allowed.unsqueeze(1)
        if implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                           torch.finfo(dtype).min)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[R, L, ...] outputs -> [B, T, ...] in the plain layout, 0 past each completion's end."""
        flat = packed.reshape(-1, *packed.shape[2:])[self.index]
        valid = self.valid.view(*self.valid.shape, *([1] * (flat.dim() - 2)))
        return flat * valid


# Model types whose layers mix tokens only through attention under the mask transformers builds (or ours), with
# positions from ``position_ids``; any other model keeps the plain layout.
PURE_ATTENTION = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "phi", "phi3",
    "gpt2", "gpt_neox", "olmo", "olmo2", "granite", "smollm3", "starcoder2", "stablelm", "cohere",
})


def packable(model, length: int) -> bool:
    """Whether packed trees give ``model`` the outputs of the plain layout of ``length`` columns (prompt width +
    completion width): a pure-attention decoder (``PURE_ATTENTION``), attention that takes a custom 4D mask, and no
    sliding window shorter than ``length`` in force (the custom mask would drop it)."""
    config = getattr(model, "config", None)
    if not ENABLED or config is None:
        return False
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return (getattr(config, "model_type", None) in PURE_ATTENTION
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and not any(kind not in ("full_attention", "sliding_attention")
                        for kind in (getattr(config, "layer_types", None) or []))
            and (not window or window >= length))


def pack_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, group_size: int) -> PackedRows | None:
    """The batch (left-padded prompts, right-padded completions) as packed trees, one tree per run of
    ``group_size`` rows that share a prompt (1: every row its own tree; the caller checks that they share it).
    None when a mask is not contiguous (a hole in a prompt or completion), a row has no prompt token, or packing
    would compute more than ``MAX_FRACTION`` of the plain layout's tokens: the plain layout handles those."""
    rows, width = prompt_ids.shape
    columns = completion_ids.shape[1]
    device = prompt_ids.device
    prompt_lengths = prompt_mask.sum(dim=1)
    completion_lengths = completion_mask.sum(dim=1)
    left_padded = prompt_mask.bool() == (torch.arange(width, device=device) >= width - prompt_lengths.unsqueeze(1))
    right_padded = completion_mask.bool() == (torch.arange(columns, device=device) < completion_lengths.unsqueeze(1))
    if rows == 0 or not bool(left_padded.all() and right_padded.all() and (prompt_lengths > 0).all()):
        return None
    if rows % group_size:
        group_size = 1
    prompt_lengths, completion_lengths = prompt_lengths.tolist(), completion_lengths.tolist()

    # Trees: (first row of the group, the rows whose branches it holds); a tree longer than the row capacity is
    # split into sub-trees, each with the trunk.
    capacity = max(ROW_TOKENS, width + columns)
    trees = []
    for first in range(0, rows, group_size):
        trunk = prompt_lengths[first] - 1
        branches = sorted(range(first, first + group_size), key=lambda b: -completion_lengths[b])
        current, size = [], trunk
        for b in branches:
            if current and size + completion_lengths[b] > capacity:
                trees.append((first, current, size))
                current, size = [], trunk
            current.append(b)
            size += completion_lengths[b]
        trees.append((first, current, size))

    # Rows: first-fit decreasing, each row as long as the longest tree.
    length = max(size for _, _, size in trees)
    packed_rows, free = [], []
    for tree in sorted(trees, key=lambda t: -t[2]):
        slot = next((r for r, room in enumerate(free) if room >= tree[2]), None)
        if slot is None:
            packed_rows.append([])
            free.append(length)
            slot = len(packed_rows) - 1
        packed_rows[slot].append(tree)
        free[slot] -= tree[2]
    plain = rows // group_size * width + rows * columns if group_size > 1 else rows * (width + columns)
    if length == 0 or len(packed_rows) * length > MAX_FRACTION * plain:
        return None

    shape = (len(packed_rows), length)
    input_ids = torch.zeros(shape, dtype=prompt_ids.dtype, device=device)
    position_ids = torch.zeros(shape, dtype=torch.long, device=device)
    tree_of = torch.full(shape, -1, dtype=torch.long, device=device)
    branch_of = torch.full(shape, -1, dtype=torch.long, device=device)
    targets = torch.full(shape, -1, dtype=completion_ids.dtype, device=device)
    index = torch.zeros((rows, columns), dtype=torch.long, device=device)
    steps = torch.arange(columns, device=device)
    number = 0
    for r, row_trees in enumerate(packed_rows):
        at = 0
        for first, branch_rows, size in row_trees:
            trunk = prompt_lengths[first] - 1
            input_ids[r, at:at + trunk] = prompt_ids[first, width - trunk - 1:width - 1]
            position_ids[r, at:at + trunk] = torch.arange(trunk, device=device)
            tree_of[r, at:at + size] = number
            at += trunk
            for b in branch_rows:
                n = completion_lengths[b]
                if n == 0:
                    continue
                span = slice(at, at + n)
                input_ids[r, at] = prompt_ids[b, width - 1]
                input_ids[r, at + 1:at + n] = completion_ids[b, :n - 1]
                position_ids[r, span] = trunk + steps[:n]
                branch_of[r, span] = b
                targets[r, span] = completion_ids[b, :n]
                index[b, :n] = r * length + at + steps[:n]
                at += n
            number += 1
    return PackedRows(input_ids, position_ids, tree_of, branch_of, targets, index, completion_mask.bool())
