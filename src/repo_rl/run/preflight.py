"""Checks that run before training starts, so a bad setting fails in seconds with one line
instead of at step 300: data sources, expert solutions, prompt lengths."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from .. import algorithms as alg
from ..config import Config
from ..data import Example
from .distributed import Dist
from ..errors import UserError


def resolve_data(files: str | list[str], cfg: Config, out: Path, dist: Dist) -> list[str]:
    """Data sources with ``toyworld:<split>`` written to ``out/data`` (rank 0 writes, every rank reads)."""
    srcs = [files] if isinstance(files, str) else list(files)
    resolved = []
    for s in srcs:
        if s.startswith("toyworld:"):
            from .. import toyworld

            split = s.split(":", 1)[1]
            tw = cfg.toyworld.world_config()
            paths = toyworld.write_datasets(tw, out / "data") if dist.is_main else None
            paths = dist.gather(paths)[0]
            if split not in paths:
                raise UserError(f"data: unknown toy-world split {split!r}; expected one of {', '.join(sorted(paths))}")
            resolved.append(str(paths[split]))
        else:
            resolved.append(s)
    return resolved


def check_solutions(method: alg.Method, examples: list[Example]) -> None:
    """A method that learns from expert solutions needs at least one training row with one."""
    specs = [alg.METHODS[p] for p in method.phases] if method.phases else [method]
    if any(s.requires_solution for s in specs) and not any(e.solution is not None for e in examples):
        raise UserError(
            f"algorithm.method={method.name} learns from expert solutions, but none of the "
            f"{len(examples)} training rows has one (set data.fields.solution to the column that "
            "holds them, or use algorithm.method=grpo)"
        )


def check_prompt_lengths(
    cfg: Config, examples: list[Example], renderer: Any, tokenizer: Any, model: Any, prompt_ids: Callable[[int], list[int]]
) -> None:
    """Every training prompt must tokenize to at least one token and fit: at most
    ``data.max_prompt_length`` tokens, and room left in the model's context
    (``max_position_embeddings``) for ``algorithm.max_completion_length`` new tokens.
    A huge text is refused from a prefix, without tokenizing all of it."""
    limit = cfg.data.max_prompt_length
    ctx = _context_length(model)
    room = ctx - cfg.algorithm.max_completion_length if ctx is not None else None
    if room is not None and room < 1:
        raise UserError(
            f"algorithm.max_completion_length={cfg.algorithm.max_completion_length}: leaves no room for a prompt in the "
            f"model's context of {ctx} tokens (max_position_embeddings); expected at most {ctx - 1}"
        )
    bound = min(x for x in (limit, room) if x is not None) if (limit or room) else None
    for i, ex in enumerate(examples):
        if bound is not None:
            if _prefix_exceeds(tokenizer, renderer.text(ex.prompt), bound):
                raise UserError(_too_long(cfg, ex, f"more than {bound}", limit, room, ctx))
        n_ids = len(prompt_ids(i))
        if n_ids == 0:
            raise UserError(f"{ex.id}: prompt has no tokens after tokenization (characters the tokenizer drops?)")
        if bound is not None and n_ids > bound:
            raise UserError(_too_long(cfg, ex, str(n_ids), limit, room, ctx))


def _too_long(cfg: Config, ex: Example, n: str, limit: Optional[int], room: Optional[int], ctx: Any) -> str:
    if limit is not None and (room is None or limit <= room):
        return f"{ex.id}: prompt has {n} tokens, more than data.max_prompt_length={limit}"
    return (
        f"{ex.id}: prompt has {n} tokens; with algorithm.max_completion_length={cfg.algorithm.max_completion_length} "
        f"it does not fit the model's context of {ctx} tokens (max_position_embeddings)"
    )


def _context_length(model: Any) -> Optional[int]:
    """The model's context (``max_position_embeddings``), or None when it does not say."""
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return ctx if isinstance(ctx, int) and ctx > 0 else None


def _prefix_exceeds(tokenizer: Any, text: str, bound: int) -> bool:
    """A huge text is over ``bound`` tokens when a prefix of ``64 x (bound + 1)`` characters already
    is (no tokenizer packs 64 characters into one token), found without tokenizing all of it."""
    cut = 64 * (bound + 1)
    return len(text) > cut and len(tokenizer(text[:cut], add_special_tokens=False)["input_ids"]) > bound


def check_rephrase_lengths(cfg: Config, method: alg.Method, examples: list[Example], renderer: Any, tokenizer: Any,
                           model: Any) -> int:
    """Prompts P(q, k) (question + expert solution) must fit the model's context with room for the
    tokens that follow them, like training prompts: RePO's rephrase prompts (``repo.rephrase_template``,
    ``repo.max_new_tokens`` new tokens) and SDFT's teacher prompts (``baselines.sdft_template``, a
    completion). A huge solution is refused at start instead of slowing every step that uses it.

    Every row is checked. The error names what overflows (the template, the solution or the new
    tokens, with the key that shortens each) and how many rows are affected. With
    ``data.on_bad_row=skip`` those rows lose their expert solution instead (they are never rephrased)
    and their number is returned for the start line."""
    specs = [alg.METHODS[p] for p in method.phases] if method.phases else [method]
    ctx = _context_length(model)
    if ctx is None:
        return 0
    uses = []
    if any(s.rephrases for s in specs):
        uses.append(("rephrase prompt", "repo.rephrase_template", cfg.repo.rephrase_template,
                     cfg.repo.max_new_tokens or cfg.algorithm.max_completion_length,
                     "repo.max_new_tokens" if cfg.repo.max_new_tokens else "algorithm.max_completion_length"))
    if any(s.teacher for s in specs):
        template, key = cfg.sdft_template
        uses.append(("SDFT teacher prompt", key, template, cfg.algorithm.max_completion_length, "algorithm.max_completion_length"))
    skipped = 0
    for what, key, template, new, new_key in uses:
        room = ctx - new
        bad: list[tuple[Example, Optional[int]]] = []
        for ex in examples:
            if ex.solution is None:
                continue
            text = renderer.text(renderer.rephrase_prompt(ex, template))
            over = _prefix_exceeds(tokenizer, text, room)
            n = None if over else len(renderer.encode(text))
            if over or (n is not None and n > room):
                bad.append((ex, n))
        if not bad:
            continue
        if cfg.data.on_bad_row == "skip":
            for ex, _ in bad:
                ex.solution = None
            skipped += len(bad)
            continue
        ex, n = bad[0]
        bare = len(renderer.encode(renderer.text(renderer.rephrase_prompt(Example(ex.prompt, ex.answer, "", id=ex.id), template))))
        cut = 64 * (ctx + 1)  # a huge solution is measured from a prefix, like the prompt above
        sol = len(tokenizer((ex.solution or "")[:cut], add_special_tokens=False)["input_ids"])
        parts = {f"the template and question ({key})": bare, "the solution": sol, f"the {new} new tokens ({new_key})": new}
        biggest = max(parts, key=lambda k: parts[k])
        shown = {k: (f"more than {v}" if k == "the solution" and len(ex.solution or "") > cut else str(v)) for k, v in parts.items()}
        fix = {f"the template and question ({key})": f"shorten {key}",
               "the solution": "shorten the solutions or leave them out of data.fields.solution",
               f"the {new} new tokens ({new_key})": f"lower {new_key}"}[biggest]
        others = f" ({len(bad)} of {sum(e.solution is not None for e in examples)} rows with a solution do not fit)"
        raise UserError(
            f"{ex.id}: the {what} has {f'more than {room}' if n is None else n} tokens and with {new} new tokens does not fit "
            f"the model's context of {ctx} tokens{others}: {', '.join(f'{k} {v}' for k, v in shown.items())}; the largest "
            f"part is {biggest}: {fix}, or use a model with a longer context (data.on_bad_row=skip never rephrases those rows)"
        )
    return skipped


def context_limit(cfg: Config, model: Any) -> Optional[int]:
    """Tokens a prompt plus its new tokens may take: the model's context, and the vLLM engine's
    ``generation.vllm_max_model_len`` when that is smaller (None: no known bound)."""
    limits = [x for x in (_context_length(model), cfg.generation.vllm_max_model_len if cfg.generation.backend == "vllm" else None)
              if x is not None]
    return min(limits) if limits else None
