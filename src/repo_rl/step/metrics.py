"""From a step's counters to the metrics TRL users know (``reward``, ``clip_ratio``, ``kl``, ...)
and RePO's own (``repo/*``, ``hard/*``), and the records of ``completions.jsonl``."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import algorithms as alg
from .types import Group

STEP_COUNTERS = ("repo/groups", "repo/gated", "repo/attempts", "repo/verified", "repo/replaced", "repo/positive")


def merge_counters(*parts: dict[str, float]) -> dict[str, float]:
    """Add dicts of sums and counts key by key."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def reward_metrics(
    rewards_all: torch.Tensor, on_policy_all: torch.Tensor, domains_all: list[Any], group_size: int
) -> dict[str, float]:
    """``reward``, ``reward_std``, ``frac_reward_zero_std`` (after composition),
    ``reward/on_policy`` and ``reward/domain/<name>`` (the rollouts' own rewards)."""
    G = group_size
    m = dict(alg.group_reward_stats(rewards_all.float(), G))
    m["reward/on_policy"] = alg.group_reward_stats(on_policy_all.float(), G)["reward"]
    for dm in sorted({x for x in domains_all if x}):
        sel = torch.tensor([x == dm for x in domains_all]).repeat_interleave(G)
        vals = on_policy_all[sel]
        vals = vals[torch.isfinite(vals)]
        m[f"reward/domain/{dm}"] = float(vals.mean()) if vals.numel() else float("nan")
    return m


def counter_metrics(c: dict[str, float]) -> dict[str, float]:
    """Rates from counters summed over ranks (``sum_dict``)."""
    ratio = lambda a, b: c[a] / c[b] if c.get(b) else float("nan")  # noqa: E731
    m: dict[str, float] = {}
    for key in sorted(c):
        if key.startswith("rewards/") and key.endswith("/count"):
            base = key[: -len("/count")]
            m[f"{base}/mean"] = ratio(f"{base}/sum", key)
        elif key.startswith("rewards/judge_") or key.endswith("/batch_errors"):
            m[key] = c[key]
    for key in ("rewards/verifier_errors", "rewards/verifier_timeouts", "rewards/invalid"):
        m[key] = c.get(key, 0.0)
    m["repo/gate_rate"] = ratio("repo/gated", "repo/groups") if c["repo/groups"] else 0.0
    # Rephrases: verified by repo.verify (what may be injected), by the training reward alone (the lax
    # rate of old runs), how many of the latter only through fallback extraction, and each check's rate.
    m["repo/rephrase_success_rate"] = ratio("repo/verified", "repo/attempts")
    m["repo/rephrase_reward_rate"] = ratio("repo/reward_ok", "repo/attempts")
    m["repo/rephrase_fallback_rate"] = ratio("repo/fallback", "repo/reward_ok") if "repo/fallback" in c else float("nan")
    for key in sorted(k for k in c if k.startswith("repo/verify/")):
        m[key] = ratio(key, "repo/attempts")
    for key in sorted(k for k in c if k.startswith("repo/judge_")):
        m[key] = c[key]
    m["repo/injected_logp_q"] = ratio("repo/inj_logp_sum", "repo/inj_logp_n")
    m["repo/replaced"] = c["repo/replaced"]
    m["repo/utilization"] = ratio("repo/positive", "repo/gated")
    m["repo/logp_gap"] = ratio("repo/gap_sum", "repo/gap_n")
    return m


def length_counters(group: Group) -> dict[str, float]:
    return {
        "len_sum": float(sum(len(s.completion_ids) for s in group.sequences)),
        "len_n": float(len(group.sequences)),
        "truncated": float(sum(s.truncated for s in group.sequences)),
    }


def track_hard_prompts(first_seen_all_fail: dict[str, bool], last_solved: dict[str, bool], ids: list[str],
                       all_fail: list[bool]) -> dict[str, float]:
    """Hard-sample utilisation, part (b): prompts that were all-fail when first seen and whose
    latest on-policy group had at least one success (see docs/EVALUATION.md). Updates both dicts."""
    for pid, failed in zip(ids, all_fail):
        first_seen_all_fail.setdefault(pid, bool(failed))
        last_solved[pid] = not bool(failed)
    hard = [k for k, v in first_seen_all_fail.items() if v]
    solved = sum(last_solved.get(k, False) for k in hard)
    return {
        "hard/first_seen_all_fail": float(len(hard)),
        "hard/solved": float(solved),
        "hard/solved_frac": solved / len(hard) if hard else float("nan"),
    }


def as_prompt_text(prompt: Any) -> str:
    """A prompt as one string for the logs: chat messages as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m) for m in prompt)
    return str(prompt)


def log_line(m: dict[str, Any], max_steps: int) -> str:
    """One plain log line of a step's metrics (TRL's ``logging_steps`` habit; no carriage returns)."""
    def f(key: str, fmt: str) -> str:
        v = m.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    if "sdft/reverse_kl" in m:  # a self-distillation step: no gate, no rephrases
        method = f"reverse kl {f('sdft/reverse_kl', '.4f')}"
    else:
        method = f"gate {f('repo/gate_rate', '.2f')} | rephrase ok {f('repo/rephrase_success_rate', '.2f')}"
    return (f"step {m.get('step')}/{max_steps} | loss {f('loss', '.4f')} | reward {f('reward', '.3f')} | "
            f"{method} | lr {f('learning_rate', '.2e')} | {f('time/step', '.2f')} s/step")


def completion_records(group: Group, adv: torch.Tensor, step: int, group_size: int) -> list[dict[str, Any]]:
    """One ``completions.jsonl`` record per row of this rank (groups numbered from 0)."""
    records = []
    for i, (text, r, o) in enumerate(zip(group.texts, group.rewards.tolist(), group.origins.tolist())):
        ex = group.examples[i // group_size]
        records.append(
            {
                "step": step,
                "prompt_id": ex.id,
                "prompt": as_prompt_text(ex.prompt),
                "answer": ex.answer,
                "group": i // group_size,
                "origin": alg.ORIGIN_NAMES[o],
                "reward": None if math.isnan(r) else r,
                "advantage": float(adv[i]),
                "in_loss": not bool(group.dropped[i]),
                "text": text,
            }
        )
    return records


def write_completions(shards: list[tuple[list[dict], int]], write: Callable[[dict], None]) -> None:
    """Records gathered from every rank, their group numbers made global."""
    offset = 0
    for rank_records, n_groups in shards:
        for rec in rank_records:
            rec["group"] += offset
            write(rec)
        offset += n_groups
