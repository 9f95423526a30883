"""The update: micro-batches, log-probs under q, the loss, backward and the optimizer step.

:class:`PolicyUpdate` owns everything between "these rows, with these advantages" and "the
weights moved": the forward passes (policy, old policy for ``num_iterations > 1``, reference
for ``beta > 0``, teacher for SDFT), the per-row losses of :mod:`repo_rl.algorithms.losses`, gradient
accumulation with global normalisers, and the DDP / FSDP / DeepSpeed branches.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .. import algorithms as alg
from ..config import Config
from .logprobs import completion_logits, completion_logprobs, logprobs_from_logits, shared_prompt_logprobs
from .types import Sequence_


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    """``loss``, ``grad_norm``, ``clip_ratio*``, ``entropy``, ``kl``, ``learning_rate``, ``train/*``."""
    logp_sums: dict[int, float]
    """Row -> log pi(o | q) before the update, for the rows asked for."""
    skipped: bool
    """The loss or the gradient was not finite: the optimizer did not step."""
    timings: dict[str, float]
    """``logprobs`` (old and reference passes) and ``update`` seconds."""


class PolicyUpdate:
    """The update of one step; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        dist: Any,  # repo_rl.run.distributed.Dist
        model: Any,
        core: Any,
        ref_model: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        device: torch.device,
        pad_token_id: int,
        autocast_dtype: Optional[torch.dtype],
        lora: bool,
    ) -> None:
        self.cfg, self.dist = cfg, dist
        self.model, self.core, self.ref_model = model, core, ref_model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.pad_token_id = device, pad_token_id
        self.autocast_dtype, self.lora = autocast_dtype, lora

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_logprobs(
        self,
        model: Any,
        seqs: Sequence[Sequence_],
        with_grad: bool,
        want_entropy: bool = False,
        want_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Per-token log-probs of each completion under its prompt ``[B, T]``, mask ``[B, T]``,
        entropies, and (``want_logits``) the ``[B, T, V]`` logits / temperature they come from."""
        B = len(seqs)
        T = max(max(len(s.completion_ids) for s in seqs), 1)
        P = max(len(s.prompt_ids) for s in seqs)
        temps = [1.0 if s.kind == alg.KIND_SFT else self.temperature() for s in seqs]
        temperature = temps[0] if len(set(temps)) == 1 else torch.tensor(temps)
        if not want_logits and self.share_prompts(model, seqs):
            return self.shared_prompt_forward(model, seqs, with_grad, want_entropy, temperature)
        L = P + T
        pad = self.pad_token_id
        ids = torch.full((B, L), pad, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        cmask = torch.zeros((B, T), dtype=torch.float32)
        for i, s in enumerate(seqs):
            # Left-pad prompts so every completion starts at column P.
            p, c = s.prompt_ids, s.completion_ids
            ids[i, P - len(p) : P] = torch.tensor(p)
            attn[i, P - len(p) : P] = 1
            if c:
                ids[i, P : P + len(c)] = torch.tensor(c)
                attn[i, P : P + len(c)] = 1
                cmask[i, : len(c)] = 1
        ids, attn, cmask = ids.to(self.device), attn.to(self.device), cmask.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
        with ctx, self.autocast():
            if want_logits:
                logits = completion_logits(model, ids, attn, pos, T, temperature)
                logp, ent = logprobs_from_logits(logits, ids[:, P : P + T], want_entropy)
                return logp, cmask, ent, logits
            logp, ent = completion_logprobs(
                model, ids, attn, pos, P, T, self.cfg.train.logprob_chunk_size, want_entropy, temperature
            )
        return logp, cmask, ent, None

    def share_prompts(self, model: Any, seqs: Sequence[Sequence_]) -> bool:
        """Whether ``train.share_prompt`` applies to this pass: rows repeat a prompt, the weights are
        whole on this rank, no activation checkpointing and no chunked log-probs."""
        if not self.cfg.train.share_prompt or self.cfg.train.logprob_chunk_size or self.dist.sharded or self.dist.engine is not None:
            return False
        flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
        if getattr(model, flag, False):  # transformers >= 5 renamed it
            return False
        return len({tuple(s.prompt_ids) for s in seqs}) < len(seqs)

    def shared_prompt_forward(self, model: Any, seqs: Sequence[Sequence_], with_grad: bool, want_entropy: bool, temperature):
        """:meth:`forward_logprobs` through :func:`~repo_rl.step.logprobs.shared_prompt_logprobs`."""
        index: dict[tuple[int, ...], int] = {}
        rows = [index.setdefault(tuple(s.prompt_ids), len(index)) for s in seqs]
        prompts = list(index)
        U, B = len(prompts), len(seqs)
        P = max(len(p) for p in prompts)
        T = max(max(len(s.completion_ids) for s in seqs), 1)
        pad = self.pad_token_id
        pids = torch.full((U, P), pad, dtype=torch.long)
        pmask = torch.zeros((U, P), dtype=torch.long)
        for u, p in enumerate(prompts):
            pids[u, P - len(p) :] = torch.tensor(p)
            pmask[u, P - len(p) :] = 1
        cids = torch.full((B, T), pad, dtype=torch.long)
        cmask = torch.zeros((B, T), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s.completion_ids:
                cids[i, : len(s.completion_ids)] = torch.tensor(s.completion_ids)
                cmask[i, : len(s.completion_ids)] = 1
        dev = self.device
        ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
        with ctx, self.autocast():
            logp, ent = shared_prompt_logprobs(model, pids.to(dev), pmask.to(dev), torch.tensor(rows, device=dev), cids.to(dev),
                                               cmask.to(dev), want_entropy, temperature)
        return logp, cmask.to(dev, torch.float32), ent, None

    def importance_sampling(self) -> bool:
        """``algorithm.vllm_importance_sampling_correction`` in force (None: on with ``train.max_staleness`` 1)."""
        on = self.cfg.algorithm.vllm_importance_sampling_correction
        return bool(self.cfg.train.max_staleness > 0 if on is None else on)

    def temperature(self) -> float:
        """Temperature of the training, old and reference log-probs: the rollouts' (1 for greedy)."""
        t = self.cfg.algorithm.temperature
        return t if t > 0 else 1.0

    def micro_batches(self, seqs: Sequence[Sequence_], rows: Optional[Sequence[int]] = None) -> list[Optional[list[int]]]:
        """Indices of ``rows`` (default: all) grouped by total length (less padding); the loss normalisers are global.

        Under FSDP and DeepSpeed every rank must run the same number of forward and backward
        passes, so a rank with fewer micro-batches gets ``None`` entries: a one-token forward
        whose loss is multiplied by zero (see :meth:`filler`).
        """
        rows = range(len(seqs)) if rows is None else rows
        order = sorted(rows, key=lambda i: (len(seqs[i].prompt_ids) + len(seqs[i].completion_ids), i))
        mb = self.cfg.train.micro_batch_size
        chunks: list[Optional[list[int]]] = [order[s : s + mb] for s in range(0, len(order), mb)]
        if self.dist.sharded:
            chunks += [None] * (self.dist.max_int(len(chunks)) - len(chunks))
        return chunks

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; under DeepSpeed, gradients are reduced at the last one."""
        engine = self.dist.engine
        if engine is None:
            loss.backward()
            return
        # engine.forward would mark a new micro-step; repo-rl calls the module directly, so it
        # does it here, or ZeRO-3 overwrites instead of accumulating the earlier micro-batches.
        engine.optimizer.clear_backward_seen_flag()
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss * self.dist.world)  # DeepSpeed averages over ranks; repo-rl sums

    def filler(self) -> list[Sequence_]:
        pad = self.pad_token_id
        return [Sequence_([pad], [pad], truncated=False)]

    @torch.no_grad()
    def logprobs(self, model: Any, seqs: Sequence[Sequence_], rows: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
        """Log-probs of the completions of ``rows`` (default: all); None for the others."""
        out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
        for chunk in self.micro_batches(seqs, rows):
            if chunk is None:
                self.forward_logprobs(model, self.filler(), with_grad=False)
                continue
            logp, mask, _, _ = self.forward_logprobs(model, [seqs[i] for i in chunk], with_grad=False)
            for j, i in enumerate(chunk):
                out[i] = logp[j, : int(mask[j].sum())].cpu()
        return out

    def with_initial(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(model)`` on the initial weights: the reference copy, or the base model under LoRA (no
        second copy). The trainer builds the copy whenever ``beta > 0`` or an SDFT teacher needs it."""
        if self.ref_model is not None:
            return fn(self.ref_model)
        if not self.lora:
            raise RuntimeError("the initial model is needed but no reference copy was built")
        with self.model.disable_adapter():
            return fn(self.core)

    def with_teacher(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(model)`` on the SDFT teacher's weights (``baselines.sdft_teacher``)."""
        return self.with_initial(fn) if self.cfg.baselines.sdft_teacher == "initial" else fn(self.core)

    def has_teacher(self, seqs: Sequence[Sequence_], rows: Sequence[int]) -> bool:
        """Whether some row is scored by a teacher; under sharded weights, on any rank (every rank
        must then run the teacher's passes)."""
        need = any(seqs[i].teacher_prompt_ids is not None for i in rows)
        return bool(self.dist.max_int(int(need))) if self.dist.sharded else need

    @staticmethod
    def teacher_view(seqs: Sequence[Sequence_]) -> list[Sequence_]:
        """The rows under their teacher prompts (rows without one keep theirs; their signal is dropped)."""
        return [Sequence_(s.teacher_prompt_ids or s.prompt_ids, s.completion_ids, s.truncated, s.kind) for s in seqs]

    def __call__(
        self, seqs: Sequence[Sequence_], advantages: torch.Tensor, valid: torch.Tensor, keep_logp: Sequence[int] = ()
    ) -> UpdateResult:
        """One optimizer step (``algorithm.num_iterations`` of them) on this rank's rows.

        ``valid`` marks the rows in the loss; ``keep_logp`` the rows whose log pi(o | q) before the
        update is wanted back (``UpdateResult.logp_sums``, for ``repo/logp_gap``)."""
        cfg = self.cfg
        a = cfg.algorithm
        loss_mask_seq = valid.clone()
        if a.mask_truncated_completions:
            # Only sampled completions are masked; expert/SFT text cut to the limit still trains.
            sampled = (alg.KIND_POLICY, alg.KIND_DISTILL)
            loss_mask_seq &= torch.tensor([not (s.truncated and s.kind in sampled) for s in seqs])
        # Loss normalisers are totals over the global batch (all micro-batches, all ranks).
        totals = self.dist.sum_dict({
            "seq": float(loss_mask_seq.sum()),
            "tok": float(sum(len(s.completion_ids) for s, v in zip(seqs, loss_mask_seq.tolist()) if v)),
        })
        n_seq, n_tok = int(totals["seq"]), int(totals["tok"])
        # train.skip_zero_advantage: rows with zero loss and gradient (masked out, or zero advantage
        # without a KL term) are not forwarded; the normalisers above still count them, so loss and
        # gradient are unchanged. Injected rephrasings are forwarded anyway, for repo/logp_gap.
        rows = list(range(len(seqs)))
        if cfg.train.skip_zero_advantage:
            kinds_all = torch.tensor([s.kind for s in seqs], dtype=torch.long)
            trained = loss_mask_seq & ~alg.zero_gradient_rows(advantages.cpu(), kinds_all, a.beta)
            trained[list(keep_logp)] = loss_mask_seq[list(keep_logp)]
            rows = trained.nonzero().squeeze(-1).tolist()
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        logp_sums: dict[int, float] = {}
        keep = set(keep_logp)
        old_logps = self.logprobs(self.core, seqs, rows) if a.num_iterations > 1 else None
        ref_logps = self.with_initial(lambda m: self.logprobs(m, seqs, rows)) if a.beta > 0 else None
        # SDFT: sampled_token needs the teacher's log-prob of each sampled token, taken here once;
        # full_logits needs its whole distribution, taken per micro-batch in the loop below.
        teacher_on = self.has_teacher(seqs, rows)
        full_kl = teacher_on and cfg.baselines.sdft_mode == "full_logits"
        teacher_logps = None
        if teacher_on and not full_kl:
            teacher_rows = [i for i in rows if seqs[i].teacher_prompt_ids is not None]
            teacher_logps = self.with_teacher(lambda m: self.logprobs(m, self.teacher_view(seqs), teacher_rows))
        timings["logprobs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "clip_tokens": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0,
                 "rows_not_forwarded": float(len(seqs) - len(rows)), "teacher_kl": 0.0, "teacher_tokens": 0.0,
                 "is_sum": 0.0, "is_tokens": 0.0, "is_diff_sum": 0.0}
        is_on = self.importance_sampling()
        is_min, is_max, diff_max = math.inf, -math.inf, 0.0
        # The sampler's log-probs of the on-policy rollouts (None for every other row), set against the
        # training policy's before this update (``old``) in each micro-batch.
        sampler_lps = [torch.tensor(s.sampler_logps) if s.sampler_logps is not None and s.kind == alg.KIND_POLICY else None
                       for s in seqs] if is_on else None
        grad_norms: list[float] = []
        skipped = False
        engine = self.dist.engine
        for it in range(a.num_iterations):
            if engine is None:
                self.optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            chunks = self.micro_batches(seqs, rows)
            if not chunks and n_seq > 0:
                # Every row here has zero gradient: a zero-loss filler pass still gives every
                # parameter a (zero) gradient, so the optimizer steps exactly as without skipping.
                chunks = [None]
            for ci, chunk in enumerate(chunks):
                last = ci == len(chunks) - 1
                if chunk is None:  # a filler (see above, and micro_batches); adds nothing to the gradient
                    logp, _, _, _ = self.forward_logprobs(self.core, self.filler(), with_grad=True)
                    if full_kl:  # the teacher's pass too, so every rank runs the same passes
                        self.with_teacher(lambda m: self.forward_logprobs(m, self.filler(), with_grad=False))
                    if n_seq > 0:
                        self.backward(logp.sum() * 0.0, last)
                    continue
                mb = [seqs[i] for i in chunk]
                logp, mask, ent, logits = self.forward_logprobs(self.core, mb, with_grad=True, want_entropy=(it == 0), want_logits=full_kl)
                if it == 0 and keep:
                    for j, i in enumerate(chunk):
                        if i in keep:
                            logp_sums[i] = float((logp[j].detach() * mask[j]).sum())
                seq_w = loss_mask_seq[chunk].to(mask.device, mask.dtype)
                mask = mask * seq_w.unsqueeze(-1)
                T = logp.shape[1]

                def stack(vals: Optional[list[torch.Tensor]]) -> Optional[torch.Tensor]:
                    if vals is None:
                        return None
                    out = torch.zeros(len(chunk), T)
                    for j, i in enumerate(chunk):
                        if vals[i] is not None:
                            out[j, : vals[i].numel()] = vals[i]
                    return out.to(logp.device)

                old = stack(old_logps)
                old = logp.detach() if old is None else old
                kinds = torch.tensor([seqs[i].kind for i in chunk], device=logp.device)
                teacher, distill_kl = stack(teacher_logps), None
                if teacher_on:
                    # A row without a teacher prompt (no expert solution) is its own teacher: no signal.
                    has = torch.tensor([seqs[i].teacher_prompt_ids is not None for i in chunk], device=logp.device).view(-1, 1)
                    if full_kl:
                        t_logits = self.with_teacher(lambda m: self.forward_logprobs(m, self.teacher_view(mb), False, want_logits=True)[3])
                        distill_kl = torch.where(has, alg.reverse_kl(logits, t_logits), 0.0)
                        per_token_kl = distill_kl.detach()
                    else:
                        teacher = torch.where(has, teacher, logp.detach())
                        per_token_kl = (logp - teacher).detach()
                    if it == 0:
                        tmask = mask * has.to(mask.dtype)
                        stats["teacher_kl"] += float((per_token_kl * tmask).sum())
                        stats["teacher_tokens"] += float(tmask.sum())
                adv = alg.token_advantages(advantages[chunk].to(logp.device, logp.dtype), kinds, logp, teacher)
                per_tok, parts = alg.token_loss(
                    logp, old, adv, kinds, epsilon_low=a.epsilon, epsilon_high=cfg.epsilon_high,
                    gamma=cfg.baselines.luffy_gamma, beta=a.beta, ref_logp=stack(ref_logps),
                    use_bias_correction_kl=a.use_bias_correction_kl, clip_ratio_c=a.clip_ratio_c,
                    log_ratio_bound=a.log_ratio_bound, distill_is_clip=cfg.baselines.sdft_is_clip, distill_kl=distill_kl,
                )
                if sampler_lps is not None:
                    samp = stack(sampler_lps)
                    has = torch.tensor([sampler_lps[i] is not None for i in chunk], device=old.device).view(-1, 1)
                    is_mask = mask * has.to(mask.dtype)
                    ratio = alg.sampling_importance_ratio(old, samp, is_mask, a.vllm_importance_sampling_mode,
                                                          a.vllm_importance_sampling_clip_min, a.vllm_importance_sampling_clip_max)
                    ratio = torch.where(has, ratio, torch.ones_like(ratio))
                    per_tok = per_tok * ratio
                    if it == 0 and bool(is_mask.any()):
                        on = is_mask > 0
                        stats["is_sum"] += float(ratio[on].sum())
                        stats["is_tokens"] += float(on.sum())
                        diff = (old - samp).abs()[on]
                        stats["is_diff_sum"] += float(diff.sum())
                        is_min, is_max = min(is_min, float(ratio[on].min())), max(is_max, float(ratio[on].max()))
                        diff_max = max(diff_max, float(diff.max()))
                low, high = parts["clip_low"], parts["clip_high"]
                if "kl" in parts and it == 0:
                    stats["kl"] += float((parts["kl"] * mask).sum())
                loss = alg.aggregate(per_tok, mask, a.loss_type, num_sequences=n_seq, num_tokens=n_tok, max_completion_length=a.max_completion_length)
                if n_seq > 0:
                    self.backward(loss, last)
                loss_total += float(loss.detach())  # this rank's share of the global loss
                # Clipping is counted over every iteration: with num_iterations=1 the ratio is 1
                # by construction, and only later iterations can leave the trust region.
                stats["clip_tokens"] += float(mask.sum())
                stats["clip_low"] += float((low.float() * mask).sum())
                stats["clip_high"] += float((high.float() * mask).sum())
                if it == 0:
                    stats["tokens"] += float(mask.sum())
                    if ent is not None:
                        stats["entropy"] += float((ent * mask).sum())
            loss_total = self.dist.sum_dict({"loss": loss_total})["loss"]
            if engine is not None:
                # DeepSpeed clips (train.max_grad_norm) and steps, and skips the update itself when
                # the gradient norm is not finite.
                gn = 0.0
                if n_seq > 0:
                    engine.step()
                    norm = engine.get_global_grad_norm()
                    gn = float(norm) if norm is not None else float("nan")
                if not math.isfinite(gn):
                    skipped = True
                    break
                grad_norms.append(gn)
                stats["loss"] += loss_total / a.num_iterations
                continue
            self.dist.all_reduce_grads(self.model.parameters())
            params = [p for p in self.model.parameters() if p.grad is not None]
            if params:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf"))
                gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # a DTensor under FSDP
            else:
                gn = 0.0
            if not math.isfinite(loss_total) or not math.isfinite(gn):
                self.optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            grad_norms.append(gn)
            stats["loss"] += loss_total / a.num_iterations
            self.optimizer.step()
            # Free the gradients now rather than at the next zero_grad: they are a model-sized
            # buffer that would otherwise sit through the next step's generation.
            self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            self.scheduler.step()
        timings["update"] = time.perf_counter() - t0
        loss_sum = stats.pop("loss")
        stats = self.dist.sum_dict(stats)
        tok = max(stats["tokens"], 1.0)
        ctok = max(stats["clip_tokens"], 1.0)
        out = {
            "loss": loss_sum if not skipped else float("nan"),
            "grad_norm": (sum(grad_norms) / len(grad_norms)) if grad_norms else float("nan"),
            "clip_ratio/low_mean": stats["clip_low"] / ctok,
            "clip_ratio/high_mean": stats["clip_high"] / ctok,
            "clip_ratio/region_mean": (stats["clip_low"] + stats["clip_high"]) / ctok,
            "entropy": stats["entropy"] / stats["tokens"] if stats["tokens"] else float("nan"),
            "kl": stats["kl"] / tok if a.beta > 0 else 0.0,
            "learning_rate": self.scheduler.get_last_lr()[0],
        }
        out["clip_ratio"] = out["clip_ratio/region_mean"]
        if is_on:  # TRL's names
            gathered = self.dist.gather((is_min, is_max, diff_max))
            n = stats["is_tokens"]
            nan = float("nan")
            out["sampling/importance_sampling_ratio/mean"] = stats["is_sum"] / n if n else nan
            out["sampling/importance_sampling_ratio/min"] = min(g[0] for g in gathered) if n else nan
            out["sampling/importance_sampling_ratio/max"] = max(g[1] for g in gathered) if n else nan
            out["sampling/sampling_logp_difference/mean"] = stats["is_diff_sum"] / n if n else nan
            out["sampling/sampling_logp_difference/max"] = max(g[2] for g in gathered) if n else nan
        out["train/skipped_step"] = float(skipped)
        out["train/rows_not_forwarded"] = stats["rows_not_forwarded"]
        if teacher_on:
            # KL(pi || pi_teacher) per token before the update: exact (full_logits) or its
            # sampled-token estimate (sampled_token).
            out["sdft/reverse_kl"] = stats["teacher_kl"] / stats["teacher_tokens"] if stats["teacher_tokens"] else float("nan")
        return UpdateResult(out, logp_sums, skipped, timings)


def lr_factor(t: Any, step: int) -> float:
    """Learning-rate multiplier at ``step`` (``train.warmup_steps``, then ``train.lr_scheduler``)."""
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_scheduler == "constant":
        return 1.0
    span = max(t.max_steps - t.warmup_steps, 1)
    frac = min(max(step - t.warmup_steps, 0) / span, 1.0)
    if t.lr_scheduler == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))
