"""How close two greedy runs of the same prompts are (e.g. TP=1 against TP=2).

A run is a list, one entry per prompt, of `{"token_ids": [...], "logprobs": [...],
"margins": [...]}`: the generated tokens, the log-probability of each under the engine
that generated it, and the engine's top-1 minus top-2 log-probability at that step (how
close greedy decoding was to a tie). `compare_runs(a, b)` reports

- `token_match_fraction`: generated positions where both runs have the same token;
- `common_prefix_fraction`: tokens before each prompt's first divergence, over all tokens
  (after a divergence the two continuations are different texts, so this is the stricter
  number);
- `identical_sequences`, `first_divergence` (per prompt, None when identical) and its
  minimum and median over the prompts that diverge;
- `margin_at_divergence`: run a's greedy margin where each divergence happened (a small
  margin means a near-tie flipped by rounding, not a different model);
- `mean_abs_logprob_diff` / `max_abs_logprob_diff`: |logprob_a - logprob_b| of the same
  token at the positions of the common prefix.
"""

from __future__ import annotations

from typing import Any


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the sequences differ (a length difference counts
    at the shorter length); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_runs(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    if len(a) != len(b):
        raise ValueError(f"runs have {len(a)} and {len(b)} prompts")
    total = matched = prefix_tokens = identical = 0
    divergences: list[int | None] = []
    margins: list[float] = []
    diffs: list[float] = []
    for ra, rb in zip(a, b):
        ta, tb = ra["token_ids"], rb["token_ids"]
        total += max(len(ta), len(tb))
        matched += sum(x == y for x, y in zip(ta, tb))
        d = first_divergence(ta, tb)
        divergences.append(d)
        prefix = min(len(ta), len(tb)) if d is None else d
        prefix_tokens += prefix
        if d is None:
            identical += 1
        elif d < len(ra.get("margins") or []):
            margins.append(ra["margins"][d])
        la, lb = ra.get("logprobs") or [], rb.get("logprobs") or []
        diffs += [abs(la[i] - lb[i]) for i in range(min(prefix, len(la), len(lb)))
                  if la[i] is not None and lb[i] is not None]
    diverged = sorted(d for d in divergences if d is not None)
    return {
        "prompts": len(a),
        "tokens": total,
        "token_match_fraction": _round(matched / total) if total else None,
        "common_prefix_fraction": _round(prefix_tokens / total) if total else None,
        "identical_sequences": identical,
        "first_divergence": divergences,
        "min_first_divergence": diverged[0] if diverged else None,
        "median_first_divergence": diverged[len(diverged) // 2] if diverged else None,
        "margin_at_divergence": [_round(m) for m in margins],
        "logprob_positions": len(diffs),
        "mean_abs_logprob_diff": _round(sum(diffs) / len(diffs)) if diffs else None,
        "max_abs_logprob_diff": _round(max(diffs)) if diffs else None,
    }


def chosen_logprobs(token_ids: list[int], step_logprobs) -> tuple[list, list]:
    """From vLLM's per-step `{token_id: Logprob}` dicts (requested with `logprobs >= 2`):
    the log-probability of each generated token and the step's top-1/top-2 margin."""
    chosen, margins = [], []
    for token, step in zip(token_ids, step_logprobs or []):
        entry = step.get(token) if step else None
        chosen.append(float(entry.logprob) if entry is not None else None)
        ranked = sorted((float(v.logprob) for v in step.values()), reverse=True) if step \
            else []
        margins.append(ranked[0] - ranked[1] if len(ranked) >= 2 else None)
    return chosen, margins


def _round(x: float) -> float:
    return round(float(x), 6)
