"""Warm start of the toy world's tiny model, and the on-disk model cache.

The warm start trains from scratch on a stream of (prompt, target) pairs, loss on the target
only. Each batch mixes (``ToyWorldConfig.ws_mix``):

1. native solutions of easy-operator questions (``Q<a><op>?`` -> ``k...;=...``);
2. general-family items (``P<a>-<b>?``);
3. rephrase on easy operators: ``REPHRASE_TEMPLATE(question, expert)`` -> native solution;
4. rephrase on throwaway symbols, each time with a fresh random key, so the key can only be
   read from the expert text.

Hard operators never appear. In the ``hard_rephrase`` variant only *explicit* expert traces
(the ones that state the key digits) are used, so the policy never learns to read the terse
ones: rephrasing hard items succeeds on explicit traces and mostly fails on terse ones.

Values of ``a`` reserved for held-out evaluation never appear either.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .model import build_model, n_params
from .tokenizer import CharCodec, build_tokenizer
from .world import (
    REPHRASE_TEMPLATE,
    ToyWorldConfig,
    World,
    expert_solution,
    general_solution,
    get_world,
    native_solution,
)

#: Shipped warm-started weights: ``weights/<model_hash>/{model.safetensors,toyworld.json}``.
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
META_FILE = "toyworld.json"


# ----------------------------------------------------------------------------------------------
# Warm-start data
# ----------------------------------------------------------------------------------------------
def warmstart_example(cfg: ToyWorldConfig, world: World, rng: random.Random, kind: int) -> tuple[str, str]:
    """One (prompt, target) pair of the given kind (0 native easy, 1 general, 2 rephrase easy,
    3 rephrase throwaway)."""
    if kind == 1:
        a = world.fmt(rng.randrange(10 ** cfg.num_digits))
        b = world.fmt(rng.randrange(10 ** cfg.num_digits))
        return f"P{a}-{b}?", general_solution(a, b)
    a = world.fmt(rng.choice(world.train_values))
    if kind in (0, 2):
        op = rng.choice(world.easy_ops)
        key = world.keys[op]
    else:
        op = rng.choice(world.throwaway_ops)
        key = tuple(rng.randint(1, 9) for _ in range(cfg.num_digits))
    q = f"Q{a}{op}?"
    target = native_solution(a, key)
    if kind == 0:
        return q, target
    expert = expert_solution(cfg, a, key, rng, implicit=False)
    return REPHRASE_TEMPLATE.format(question=q, solution=expert), target


def warmstart_batch(cfg: ToyWorldConfig, world: World, rng: random.Random, codec: CharCodec,
                    batch_size: int, n_buckets: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One step's data as ``n_buckets`` chunks of right-padded input ids and labels (-100
    outside the targets). Chunks group sequences of similar length, which saves padding
    (native items are ~45 tokens, rephrase items ~100)."""
    mix = cfg.ws_mix
    if not world.throwaway_ops:
        mix = (mix[0], mix[1], mix[2], 0.0)
    kinds = rng.choices(range(4), weights=mix, k=batch_size)
    pairs = []
    for kind in kinds:
        p, t = warmstart_example(cfg, world, rng, kind)
        pi = codec.encode(p)
        ti = codec.encode(t) + [codec.eos_id]
        pairs.append((pi + ti, [-100] * len(pi) + ti))
    if n_buckets > 1:
        pairs.sort(key=lambda st: len(st[0]))
    chunks = []
    size = math.ceil(len(pairs) / max(1, n_buckets))
    for c in range(0, len(pairs), size):
        part = pairs[c:c + size]
        L = max(len(s) for s, _ in part)
        x = torch.full((len(part), L), codec.pad_id, dtype=torch.long)
        y = torch.full((len(part), L), -100, dtype=torch.long)
        for i, (s, lab) in enumerate(part):
            x[i, :len(s)] = torch.tensor(s)
            y[i, :len(lab)] = torch.tensor(lab)
        chunks.append((x, y))
    return chunks


# ----------------------------------------------------------------------------------------------
# Warm start
# ----------------------------------------------------------------------------------------------
def _lr_at(step: int, cfg: ToyWorldConfig, total: int) -> float:
    if step < cfg.ws_warmup:
        return cfg.ws_lr * (step + 1) / cfg.ws_warmup
    t = (step - cfg.ws_warmup) / max(1, total - cfg.ws_warmup)
    return cfg.ws_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def warm_start(cfg: ToyWorldConfig, steps: int | None = None, progress: bool = True,
               callback: Callable[[int, Any, float], None] | None = None):
    """Train a fresh model on the warm-start mix. Returns ``(model, tokenizer, info)``.

    ``steps`` overrides ``cfg.ws_steps`` (the learning-rate schedule follows it). ``callback``
    is called as ``callback(step, model, loss)`` after every step.
    """
    steps = cfg.ws_steps if steps is None else steps
    old_threads = torch.get_num_threads()
    if cfg.ws_threads:
        torch.set_num_threads(cfg.ws_threads)
    try:
        world = get_world(cfg)
        codec = CharCodec()
        tokenizer = build_tokenizer()
        model = build_model(cfg)
        # Eager attention trains ~30% faster than SDPA at this size on CPU (bf16 backward).
        saved_impl = model.config._attn_implementation
        model.config._attn_implementation = "eager"
        model.train()
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.ws_weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.ws_lr, betas=(0.9, 0.98), eps=1e-8,
        )
        rng = random.Random(f"toyworld-warmstart-{cfg.seed}-{cfg.ws_seed}")
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="toyworld warm start", unit="step")
        t0 = time.perf_counter()
        loss_ema = None
        t_callback = 0.0
        for step in range(steps):
            lr = _lr_at(step, cfg, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            chunks = warmstart_batch(cfg, world, rng, codec, cfg.ws_batch_size, n_buckets=2)
            n_tok = sum(int((y[:, 1:] != -100).sum()) for _x, y in chunks)
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for x, y in chunks:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.ws_bf16):
                    logits = model(input_ids=x).logits
                part = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                    ignore_index=-100, reduction="sum",
                ) / n_tok
                part.backward()
                loss += float(part.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lv = loss
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_ema:.4f}")
            if callback is not None:
                tc = time.perf_counter()
                callback(step, model, lv)
                t_callback += time.perf_counter() - tc
        if bar is not None:
            bar.close()
        model.config._attn_implementation = saved_impl
        model.eval()
        info = {"steps": steps, "seconds": round(time.perf_counter() - t0 - t_callback, 1),
                "final_loss_ema": loss_ema, "n_params": n_params(model),
                "threads": torch.get_num_threads()}
        return model, tokenizer, info
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Directory holding ``<model_hash>/`` folders: ``cache_dir`` if given, else
    ``$REPO_RL_CACHE/toyworld``, else ``~/.cache/repo-rl/toyworld``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("REPO_RL_CACHE")
    if env:
        return Path(env) / "toyworld"
    return Path.home() / ".cache" / "repo-rl" / "toyworld"


def _is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", META_FILE))


def save_model_dir(model, tokenizer, cfg: ToyWorldConfig, path: str | Path,
                   extra_meta: dict | None = None) -> Path:
    """Save model + tokenizer + ``toyworld.json`` to ``path`` atomically (temp dir + rename).
    If ``path`` already holds a complete model (another process won the race), keep it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        model = model.to(torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"toyworld_config": cfg.to_dict(), "model_hash": cfg.model_hash(),
                "model_key": cfg.model_key()}
        meta.update(extra_meta or {})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if _is_complete(path):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                if path.exists():
                    shutil.rmtree(path)
                os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def shipped_weights(cfg: ToyWorldConfig) -> Path | None:
    """Folder of shipped weights for exactly these settings, if the package has them."""
    d = SHIPPED_DIR / cfg.model_hash()
    return d if (d / "model.safetensors").is_file() else None


def load_shipped(cfg: ToyWorldConfig):
    """A fp32 model loaded from the shipped (bf16) weights of ``cfg``, or None."""
    d = shipped_weights(cfg)
    if d is None:
        return None
    from safetensors.torch import load_file

    model = build_model(cfg)
    sd = {k: v.to(torch.float32) for k, v in load_file(str(d / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"shipped weights {d} do not fit the model: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()
    return model


def ensure_model(cfg: ToyWorldConfig | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True) -> Path:
    """HF-format directory (model + tokenizer) of the warm-started model for ``cfg``.

    Looked up in the cache (``cache_root(cache_dir)/<cfg.model_hash()>``); otherwise made from
    the weights shipped in the package for these settings; otherwise built by running the warm
    start (minutes on a laptop CPU, with a progress bar). Writes are atomic.
    """
    cfg = cfg or ToyWorldConfig()
    path = cache_root(cache_dir) / cfg.model_hash()
    if _is_complete(path):
        return path
    model = load_shipped(cfg)
    if model is not None:
        meta = json.loads((SHIPPED_DIR / cfg.model_hash() / META_FILE).read_text())
        extra = {"source": "shipped", "warmstart": meta.get("warmstart"), "eval": meta.get("eval")}
    else:
        if progress:
            print(f"[toyworld] no cached or shipped model for these settings; warm-starting "
                  f"({cfg.ws_steps} steps) into {path}", flush=True)
        model, _tok, info = warm_start(cfg, progress=progress)
        extra = {"source": "warm_start", "warmstart": info}
    return save_model_dir(model, build_tokenizer(), cfg, path, extra)


def build_shipped(cfg: ToyWorldConfig, out_root: str | Path = SHIPPED_DIR, eval_n: int = 400,
                  progress: bool = True) -> Path:
    """Run the full warm start for ``cfg`` and write the compact (bf16) shipped weights plus a
    ``toyworld.json`` with the accuracies measured on exactly what users get (the bf16 weights,
    saved and reloaded through ``AutoModelForCausalLM`` / ``AutoTokenizer``) to
    ``out_root/<model_hash>/``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import evaluate_splits

    model, tok, info = warm_start(cfg, progress=progress)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.ws_threads))
    try:
        with tempfile.TemporaryDirectory() as td:
            d = save_model_dir(model, tok, cfg, Path(td) / "model")
            loaded = AutoModelForCausalLM.from_pretrained(d)
            t0 = time.perf_counter()
            acc = evaluate_splits(loaded, AutoTokenizer.from_pretrained(d), cfg, n=eval_n)
            eval_s = round(time.perf_counter() - t0, 1)
    finally:
        torch.set_num_threads(old_threads)
    out = Path(out_root) / cfg.model_hash()
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    save_file(sd, str(out / "model.safetensors"))
    os.chmod(out / "model.safetensors", 0o644)
    meta = {"toyworld_config": cfg.to_dict(), "model_hash": cfg.model_hash(),
            "model_key": cfg.model_key(), "warmstart": info, "eval": acc, "eval_n": eval_n,
            "eval_seconds": eval_s,
            "command": f"python -m repo_rl.toyworld build-weights --variant {cfg.variant}"
                       + (f" --seed {cfg.seed}" if cfg.seed else "")}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out
