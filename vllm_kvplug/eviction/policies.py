"""Per-KV-head token eviction policies: how many prompt tokens each (layer, head) keeps,
and which ones.

Eviction runs once, when the prompt's prefill is complete. For every layer it gets the
importance scores of the prompt tokens per KV head ([H, S], `score_snapkv`) and decides
what stays in the cache; generated tokens are never evicted. Every policy follows the
same two steps:

    budgets = policy.budgets(prompt_len, num_layers, num_kv_heads, scores_per_layer)  # [L, H]
    kept = policy.select(layer, scores_per_layer[layer], budgets[layer])  # H sorted index sets

The policies (profile `eviction.policy`):

- `streamingllm` (Xiao et al., 2023): the first `sink_tokens` (attention sinks) and the most
  recent tokens; no scores. Same budget for every (layer, head).
- `snapkv` (Li et al., 2024): the tokens with the highest observation-window scores; same
  budget for every (layer, head).
- `pyramidkv` (Cai et al., 2024): SnapKV's selection, with per-layer budgets decreasing
  linearly from the first to the last layer (attention is broad in lower layers and
  concentrated in upper ones) and the same total as SnapKV.
- `adakv` (Feng et al., 2024): SnapKV's scores, with each layer's total budget (H × the
  uniform budget) split across its heads by importance: a top-k over the layer's flattened
  [H × S] scores, after every head got a floor of `min_tokens`. Heads whose attention is
  concentrated give tokens to heads whose attention is spread.

Budget rules (every policy). The uniform per-head budget of a prompt of S tokens is
B = min(budget_fraction × S, budget_tokens) (whichever are set), raised to `min_tokens` and to
the number of mandatory tokens, and never more than S. The mandatory tokens are the sinks
(the first `sink_tokens`) and the observation window (the last `window_tokens`, whose
queries score the rest); every head keeps them and they count toward its budget. Budgets
are exact: a head keeps exactly its budget of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class EvictionPolicy:
    """Base class: the budget rules, the mandatory tokens and the score-based selection.

    Subclasses set `name`, and override `budgets` (how many tokens per layer and head)
    and/or `select` (which ones).
    """

    budget_fraction: float | None = None
    budget_tokens: int | None = None
    min_tokens: int = 64
    window_tokens: int = 32
    sink_tokens: int = 4

    name: ClassVar[str] = "base"
    uses_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.budget_fraction is None and self.budget_tokens is None:
            raise ValueError(f"{self.name}: set budget_fraction and/or budget_tokens")
        if self.budget_fraction is not None and not 0.0 < self.budget_fraction <= 1.0:
            raise ValueError(f"budget_fraction must be in (0, 1], got {self.budget_fraction}")
        if self.budget_tokens is not None and self.budget_tokens <= 0:
            raise ValueError(f"budget_tokens must be > 0, got {self.budget_tokens}")
        if self.min_tokens < 0 or self.sink_tokens < 0 or self.window_tokens <= 0:
            raise ValueError("min_tokens and sink_tokens must be >= 0, window_tokens > 0")

    # -- budget rules ------------------------------------------------------------------

    def mandatory_mask(self, prompt_len: int) -> torch.Tensor:
        """[S] bool: the sinks and the observation window, kept by every head."""
        _check_prompt_len(prompt_len)
        mask = torch.zeros(prompt_len, dtype=torch.bool)
        mask[:self.sink_tokens] = True
        mask[max(prompt_len - self.window_tokens, 0):] = True
        return mask

    def mandatory_count(self, prompt_len: int) -> int:
        return min(prompt_len, self.sink_tokens + self.window_tokens)

    def head_budget(self, prompt_len: int) -> int:
        """The uniform per-head budget B for a prompt of `prompt_len` tokens."""
        _check_prompt_len(prompt_len)
        budget = prompt_len
        if self.budget_fraction is not None:
            budget = min(budget, math.floor(self.budget_fraction * prompt_len))
        if self.budget_tokens is not None:
            budget = min(budget, self.budget_tokens)
        budget = max(budget, self.min_tokens, self.mandatory_count(prompt_len))
        return min(budget, prompt_len)

    # -- the interface -----------------------------------------------------------------

    def budgets(self, prompt_len: int, num_layers: int, num_kv_heads: int,
                scores_per_layer: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """[L, H] int64: tokens kept by every (layer, KV head). Uniform by default."""
        _check_shape(prompt_len, num_layers, num_kv_heads, scores_per_layer,
                     required=False)
        return torch.full((num_layers, num_kv_heads), self.head_budget(prompt_len),
                          dtype=torch.long)

    def select(self, layer: int, scores: torch.Tensor | None,
               budgets: torch.Tensor) -> list[torch.Tensor]:
        """Kept prompt positions of each head of `layer`: H sorted int64 tensors.

        scores: [H, S] importance (higher is kept first); budgets: [H] tokens per head.
        Every head keeps the mandatory tokens plus its highest-scored other tokens, exactly
        budgets[h] in all (ties go to the earlier position).
        """
        if scores is None:
            raise ValueError(f"{self.name} needs scores (layer {layer})")
        _check_scores(scores, layer)
        return self._keep_top(scores, budgets, layer)

    def plan(self, prompt_len: int, num_layers: int, num_kv_heads: int,
             scores_per_layer: Sequence[torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """`budgets`, then `select` for every layer: ([L, H] budgets, kept[layer][head])."""
        budgets = self.budgets(prompt_len, num_layers, num_kv_heads, scores_per_layer)
        kept = [self.select(layer, None if scores_per_layer is None
                            else scores_per_layer[layer], budgets[layer])
                for layer in range(num_layers)]
        return budgets, kept

    # -- several layers at once (the serving path) -------------------------------------

    def keep_masks(self, prompt_len: int, num_layers: int, layers: Sequence[int],
                   num_kv_heads: int, scores: torch.Tensor | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """[len(layers), H, S] bool: the tokens `select` keeps in each of `layers` with the
        budgets `budgets` gives them, for all those layers at once (a few GPU operations
        instead of several per layer and head, no host synchronisation). scores:
        [len(layers), H, S] (policies with `uses_scores` only)."""
        if scores is not None:
            if scores.dim() != 3 or scores.shape != (len(layers), num_kv_heads, prompt_len):
                raise ValueError(f"scores must be [{len(layers)}, {num_kv_heads}, "
                                 f"{prompt_len}], got {tuple(scores.shape)}")
            device = scores.device
        elif self.uses_scores:
            raise ValueError(f"{self.name} needs scores")
        budgets = self._layer_budgets(prompt_len, num_layers, layers, num_kv_heads,
                                      scores).to(device)  # [Lb, H]
        if scores is None:  # recency (StreamingLLM)
            priority = torch.arange(prompt_len, dtype=torch.float32, device=device
                                    ).expand(len(layers), num_kv_heads, prompt_len)
        else:
            priority = scores
        mandatory = self.mandatory_mask(prompt_len).to(device)
        ranked = _rank(priority, mandatory)
        in_budget = (torch.arange(prompt_len, device=device) < budgets[..., None])
        return torch.zeros_like(in_budget).scatter_(-1, ranked, in_budget)

    def _layer_budgets(self, prompt_len: int, num_layers: int, layers: Sequence[int],
                       num_kv_heads: int, scores: torch.Tensor | None) -> torch.Tensor:
        """[len(layers), H] budgets of `layers`, equal to `budgets(...)[layers]`."""
        return torch.full((len(layers), num_kv_heads), self.head_budget(prompt_len),
                          dtype=torch.long)

    # -- helpers -----------------------------------------------------------------------

    def _keep_top(self, priority: torch.Tensor, budgets: torch.Tensor,
                  layer: int) -> list[torch.Tensor]:
        """Per head: the mandatory tokens, then the highest `priority` ones."""
        heads, prompt_len = priority.shape
        budgets = torch.as_tensor(budgets)
        if budgets.shape != (heads,):
            raise ValueError(f"layer {layer}: budgets shape {tuple(budgets.shape)}, "
                             f"expected ({heads},)")
        mandatory = self.mandatory_mask(prompt_len)
        low, high = int(mandatory.sum()), prompt_len
        if int(budgets.min()) < low or int(budgets.max()) > high:
            raise ValueError(f"layer {layer}: budgets {budgets.tolist()} outside [{low}, "
                             f"{high}] (mandatory tokens .. prompt length)")
        ranked = _rank(priority, mandatory.to(priority.device))
        top = ranked[:, :int(budgets.max())].cpu()  # one device-to-host copy per layer
        return [top[h, :int(budgets[h])].sort().values for h in range(heads)]


class StreamingLLM(EvictionPolicy):
    """Attention sinks + the most recent tokens; the same budget for every head."""

    name: ClassVar[str] = "streamingllm"
    uses_scores: ClassVar[bool] = False

    def select(self, layer: int, scores: torch.Tensor | None,
               budgets: torch.Tensor) -> list[torch.Tensor]:
        if scores is None:
            raise ValueError("streamingllm.select needs the prompt length: pass scores "
                             "(only their shape is used) or call select_recent")
        _check_scores(scores, layer)
        return self.select_recent(scores.shape[1], budgets, layer, scores.shape[0])

    def select_recent(self, prompt_len: int, budgets: torch.Tensor, layer: int = 0,
                      heads: int | None = None) -> list[torch.Tensor]:
        """Sinks, then the most recent tokens, for every head."""
        budgets = torch.as_tensor(budgets)
        heads = budgets.shape[0] if heads is None else heads
        recency = torch.arange(prompt_len, dtype=torch.float32).expand(heads, prompt_len)
        return self._keep_top(recency, budgets, layer)

    def plan(self, prompt_len, num_layers, num_kv_heads, scores_per_layer=None):
        budgets = self.budgets(prompt_len, num_layers, num_kv_heads, scores_per_layer)
        kept = [self.select_recent(prompt_len, budgets[layer], layer)
                for layer in range(num_layers)]
        return budgets, kept


class SnapKV(EvictionPolicy):
    """Top observation-window scores; the same budget for every (layer, head)."""

    name: ClassVar[str] = "snapkv"

    def budgets(self, prompt_len, num_layers, num_kv_heads, scores_per_layer=None):
        _check_shape(prompt_len, num_layers, num_kv_heads, scores_per_layer, required=True)
        return super().budgets(prompt_len, num_layers, num_kv_heads, scores_per_layer)


@dataclass(frozen=True)
class PyramidKV(EvictionPolicy):
    """SnapKV selection with per-layer budgets decreasing linearly with depth.

    Of the uniform budget B, the part above the mandatory tokens (f = B - mandatory) is
    re-spread over the layers: the last layer gets f / beta, the first 2f - f / beta,
    linearly in between (PyramidKV's schedule, beta = 20 in the paper), so the total over
    the layers is the uniform total L × B. A layer cannot keep more than the whole prompt;
    what the cap removes from the lower layers goes evenly to the others. Integer budgets
    by largest remainder: the total is exact and budgets never increase with depth.
    """

    beta: float = 20.0
    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1.0:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def layer_budgets(self, prompt_len: int, num_layers: int) -> torch.Tensor:
        """[L] int64 per-head budget of every layer."""
        uniform = self.head_budget(prompt_len)
        mandatory = self.mandatory_count(prompt_len)
        free, cap = uniform - mandatory, prompt_len - mandatory
        if num_layers == 1 or free == 0:
            return torch.full((num_layers,), uniform, dtype=torch.long)
        top = free / self.beta
        bottom = 2 * free - top
        target = torch.linspace(bottom, top, num_layers, dtype=torch.float64)
        extra = _apportion(target, free * num_layers, cap)
        return extra + mandatory

    def budgets(self, prompt_len, num_layers, num_kv_heads, scores_per_layer=None):
        _check_shape(prompt_len, num_layers, num_kv_heads, scores_per_layer, required=True)
        per_layer = self.layer_budgets(prompt_len, num_layers)
        return per_layer[:, None].expand(num_layers, num_kv_heads).clone()

    def _layer_budgets(self, prompt_len, num_layers, layers, num_kv_heads, scores):
        per_layer = self.layer_budgets(prompt_len, num_layers)[list(layers)]
        return per_layer[:, None].expand(len(layers), num_kv_heads).clone()


class AdaKV(EvictionPolicy):
    """SnapKV scores; each layer's total H × B split across heads by a flattened top-k.

    Every head first gets its floor, min(B, max(min_tokens, mandatory)) tokens: the
    mandatory ones and its best others. The rest of the layer's budget, H × (B - floor),
    goes to the highest remaining scores of the whole layer, whatever their head.
    `select` with these budgets picks the same tokens (the flattened top-k takes the best
    of each head, in the same order).
    """

    name: ClassVar[str] = "adakv"

    def head_floor(self, prompt_len: int) -> int:
        return min(self.head_budget(prompt_len),
                   max(self.min_tokens, self.mandatory_count(prompt_len)))

    def budgets(self, prompt_len, num_layers, num_kv_heads, scores_per_layer=None):
        _check_shape(prompt_len, num_layers, num_kv_heads, scores_per_layer, required=True)
        uniform, floor = self.head_budget(prompt_len), self.head_floor(prompt_len)
        mandatory = self.mandatory_mask(prompt_len)
        out = torch.empty(num_layers, num_kv_heads, dtype=torch.long)
        for layer, scores in enumerate(scores_per_layer):
            _check_scores(scores, layer)
            ranked = _rank(scores, mandatory.to(scores.device))  # [H, S] positions
            # Whatever the floor does not take is ranked across heads, by score.
            rest = ranked[:, floor:]
            rest_scores = scores.float().gather(1, rest).flatten()
            pool = num_kv_heads * (uniform - floor)
            order = torch.sort(rest_scores, descending=True, stable=True).indices[:pool]
            extra = torch.bincount(torch.div(order, rest.shape[1], rounding_mode="floor"),
                                   minlength=num_kv_heads) if pool else 0
            out[layer] = floor + torch.as_tensor(extra).cpu()
        return out

    def _layer_budgets(self, prompt_len, num_layers, layers, num_kv_heads, scores):
        """`budgets` of several layers in one batch of operations (the same flattened
        stable sort per layer, so the same budgets)."""
        uniform, floor = self.head_budget(prompt_len), self.head_floor(prompt_len)
        mandatory = self.mandatory_mask(prompt_len).to(scores.device)
        ranked = _rank(scores, mandatory)  # [Lb, H, S]
        rest = ranked[..., floor:]
        rest_scores = scores.float().gather(-1, rest).flatten(1)  # [Lb, H·(S - floor)]
        pool = num_kv_heads * (uniform - floor)
        counts = torch.zeros(len(layers), num_kv_heads, dtype=torch.long,
                             device=scores.device)
        if pool:
            order = torch.sort(rest_scores, dim=-1, descending=True, stable=True
                               ).indices[:, :pool]
            heads = torch.div(order, rest.shape[-1], rounding_mode="floor")
            counts.scatter_add_(1, heads, torch.ones_like(heads))
        return floor + counts


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (StreamingLLM, SnapKV, PyramidKV, AdaKV)}


def policy_from_section(section) -> EvictionPolicy | None:
    """The policy of a profile's `eviction` section (`EvictionSection`); None for 'none'."""
    if section.policy == "none":
        return None
    try:
        cls = POLICIES[section.policy]
    except KeyError:
        raise ValueError(f"unknown eviction policy {section.policy!r}; choose one of "
                         f"none, {', '.join(POLICIES)}") from None
    return cls(budget_fraction=section.budget_fraction, budget_tokens=section.budget_tokens,
               min_tokens=section.min_tokens, window_tokens=section.window_tokens,
               sink_tokens=section.sink_tokens)


def keep_mask(kept: Sequence[torch.Tensor], prompt_len: int) -> torch.Tensor:
    """[H, S] bool mask of the kept positions of one layer (from `select`)."""
    mask = torch.zeros(len(kept), prompt_len, dtype=torch.bool)
    for head, positions in enumerate(kept):
        mask[head, positions] = True
    return mask


# -- internals -------------------------------------------------------------------------

def _rank(priority: torch.Tensor, mandatory: torch.Tensor) -> torch.Tensor:
    """[..., H, S] positions of each head, mandatory first, then by priority (desc), then
    by position (asc)."""
    # Sorting on (mandatory, priority, -position) with two stable sorts.
    order = torch.sort(priority.float(), dim=-1, descending=True, stable=True).indices
    first = mandatory[order].to(torch.int8)
    return order.gather(-1, torch.sort(first, dim=-1, descending=True, stable=True).indices)


def _apportion(target: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Non-negative integers close to `target`, each <= cap, summing to `total`."""
    if total > cap * len(target):
        raise ValueError(f"cannot fit {total} tokens in {len(target)} layers of {cap}")
    x = target.clamp(0, cap)
    for _ in range(len(target) + 1):  # each round caps at least one more layer
        deficit = total - float(x.sum())
        below = x < cap
        if deficit <= 1e-9 or not bool(below.any()):
            break
        x = torch.where(below, x + deficit / int(below.sum()), x).clamp(0, cap)
    ints = x.floor().long()
    remainder = total - int(ints.sum())
    fraction = torch.where(ints < cap, x - ints, torch.full_like(x, -1.0))
    for i in torch.sort(fraction, descending=True, stable=True).indices[:remainder]:
        ints[i] += 1
    return ints


def _check_prompt_len(prompt_len: int) -> None:
    if prompt_len <= 0:
        raise ValueError(f"prompt length must be > 0, got {prompt_len}")


def _check_scores(scores: torch.Tensor, layer: int) -> None:
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"layer {layer}: scores must be [H, S], got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"layer {layer}: scores contain NaN or infinity")


def _check_shape(prompt_len: int, num_layers: int, num_kv_heads: int,
                 scores_per_layer: Sequence[torch.Tensor] | None, required: bool) -> None:
    _check_prompt_len(prompt_len)
    if num_layers <= 0 or num_kv_heads <= 0:
        raise ValueError(f"need layers and heads, got {num_layers} and {num_kv_heads}")
    if scores_per_layer is None:
        if required:
            raise ValueError("this policy needs scores_per_layer (score_snapkv)")
        return
    if len(scores_per_layer) != num_layers:
        raise ValueError(f"scores for {len(scores_per_layer)} layers, expected {num_layers}")
    for layer, scores in enumerate(scores_per_layer):
        if tuple(scores.shape) != (num_kv_heads, prompt_len):
            raise ValueError(f"layer {layer}: scores shape {tuple(scores.shape)}, expected "
                             f"({num_kv_heads}, {prompt_len})")
