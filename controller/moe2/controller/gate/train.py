"""Gate training on stored scores (DESIGN.md §2, eq. 13), and its evaluation.

Teacher forcing makes p_{n,t} independent of θ, so training needs only the stored target
log-probabilities and the prompts' embeddings: (samples, experts, tokens) arrays, a few
seconds of torch.

    cfg = TrainConfig()
    data = TrainData.build(table, embeddings)
    result = train(data, cfg)        # result.head, result.metrics
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from moe2.controller.gate.config import TrainConfig
from moe2.controller.gate.model import GateHead
from moe2.controller.registry import ScoreTable


@dataclass
class TrainData:
    """Dense arrays for training and evaluation.

    ``logp``: (samples, options, experts, tokens) float64 log-probabilities, 0 where masked;
    ``mask``: (samples, options, tokens) bool; ``n_options``: (samples,) options per sample.
    Across vocabularies (experts tokenise differently) each option collapses to one
    sequence-level "token": Σ_t log p_{n,t}, so fusion mixes sequence likelihoods.
    """

    experts: list[str]
    apps: list[str]
    emb: np.ndarray  # (samples, dim) float32
    logp: np.ndarray
    mask: np.ndarray
    n_options: np.ndarray
    answer: np.ndarray  # (samples,) index of the correct option
    level: str  # "token" or "sequence"

    @classmethod
    def build(cls, table: ScoreTable, emb: np.ndarray) -> TrainData:
        same_length = all(
            not np.isnan(a).any() for opts in table.logp for a in opts
        )  # ragged per expert -> different tokenizers
        level = "token" if same_length else "sequence"
        opts = max(len(o) for o in table.logp)
        width = max(a.shape[1] for o in table.logp for a in o) if level == "token" else 1
        n, e = len(table.samples), len(table.experts)
        logp = np.zeros((n, opts, e, width))
        mask = np.zeros((n, opts, width), dtype=bool)
        for i, per in enumerate(table.logp):
            for o, a in enumerate(per):
                if level == "token":
                    logp[i, o, :, : a.shape[1]] = a
                    mask[i, o, : a.shape[1]] = True
                else:
                    logp[i, o, :, 0] = np.nansum(a, axis=1)
                    mask[i, o, 0] = True
        return cls(
            experts=list(table.experts),
            apps=[s.app for s in table.samples],
            emb=np.asarray(emb, dtype=np.float32),
            logp=logp,
            mask=mask,
            n_options=np.array([len(o) for o in table.logp]),
            answer=np.array([s.answer for s in table.samples]),
            level=level,
        )

    def subset(self, idx: np.ndarray) -> TrainData:
        return TrainData(
            self.experts,
            [self.apps[i] for i in idx],
            self.emb[idx],
            self.logp[idx],
            self.mask[idx],
            self.n_options[idx],
            self.answer[idx],
            self.level,
        )


def option_loglik(log_w: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log Σ_n ω_n p_{n,t} for each option: log_w (batch, experts), logp (batch, options,
    experts, tokens), mask (batch, options, tokens) -> (batch, options)."""
    mixed = torch.logsumexp(log_w[:, None, :, None] + logp, dim=2)  # (batch, options, tokens)
    return (mixed * mask).sum(-1)


def nll(log_w: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor):
    """Eq. 13 on the correct option, mean over the batch."""
    ll = option_loglik(log_w, logp, mask)  # (batch, options)
    return -ll.gather(1, answer[:, None]).squeeze(1).mean()


@dataclass
class Scores:
    """Loss and accuracy of one weighting on a data set."""

    loss: float  # mean over samples of eq. 13 on the correct target (nats)
    nll_per_token: float
    accuracy: float | None  # multiple-choice: answer log-likelihood picks the right option


def evaluate_weights(data: TrainData, log_w: np.ndarray) -> Scores:
    lw = torch.as_tensor(log_w, dtype=torch.float64)
    logp = torch.as_tensor(data.logp)
    mask = torch.as_tensor(data.mask)
    ll = option_loglik(lw, logp, mask).numpy()  # (samples, options)
    n = np.arange(len(ll))
    correct = ll[n, data.answer]
    tokens = data.mask[n, data.answer].sum()
    acc = None
    if (data.n_options > 1).any():
        masked = np.where(np.arange(ll.shape[1])[None] < data.n_options[:, None], ll, -np.inf)
        acc = float((masked.argmax(1) == data.answer).mean())
    return Scores(float(-correct.mean()), float(-correct.sum() / max(tokens, 1)), acc)


@dataclass
class Report:
    """Gate vs every single expert vs uniform weights, on one split."""

    gate: Scores
    uniform: Scores
    experts: dict[str, Scores]
    best_expert: str
    routing_accuracy: float  # gate's top expert is the one most likely to produce the target

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(data: TrainData, gate_values: np.ndarray) -> Report:
    e = len(data.experts)
    uniform = evaluate_weights(data, np.full((len(data.emb), e), -math.log(e)))
    singles = {}
    for j, name in enumerate(data.experts):
        lw = np.full((len(data.emb), e), -np.inf)
        lw[:, j] = 0.0
        singles[name] = evaluate_weights(data, lw)
    best = min(singles, key=lambda n: (-(singles[n].accuracy or 0.0), singles[n].loss))
    oracle = (data.logp[np.arange(len(data.emb)), data.answer].sum(-1)).argmax(-1)
    routing = float((gate_values.argmax(1) == oracle).mean())
    gate = evaluate_weights(data, np.log(np.clip(gate_values, 1e-30, None)))
    return Report(gate, uniform, singles, best, routing)


@dataclass
class TrainResult:
    head: GateHead
    config: TrainConfig
    train: Report
    val: Report
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        return {
            "train": self.train.as_dict(),
            "val": self.val.as_dict(),
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
        }


@torch.no_grad()
def gate_values(head: GateHead, emb: np.ndarray) -> np.ndarray:
    head.eval()
    return head(torch.as_tensor(emb, dtype=torch.float32)).double().numpy()


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def train(data: TrainData, cfg: TrainConfig) -> TrainResult:
    # The head is tiny: one thread is ~9x faster than two fighting over a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(data, cfg)
    finally:
        torch.set_num_threads(threads)


def _train(data: TrainData, cfg: TrainConfig) -> TrainResult:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tr_idx, va_idx = split(len(data.emb), cfg.val_fraction, cfg.seed)
    tr, va = data.subset(tr_idx), data.subset(va_idx)
    head = GateHead(data.emb.shape[1], len(data.experts), cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )
    emb = torch.as_tensor(tr.emb)
    logp = torch.as_tensor(tr.logp, dtype=torch.float32)
    mask = torch.as_tensor(tr.mask)
    ans = torch.as_tensor(tr.answer)
    v_emb = torch.as_tensor(va.emb)
    v_logp = torch.as_tensor(va.logp, dtype=torch.float32)
    v_mask, v_ans = torch.as_tensor(va.mask), torch.as_tensor(va.answer)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, stale, steps, micro = math.inf, copy.deepcopy(head.state_dict()), 0, 0, 0
    history: list[dict[str, float]] = []
    epoch = 0
    stop = False
    for epoch in range(1, cfg.max_epochs + 1):  # noqa: B007 (reported)
        head.train()
        perm = torch.randperm(len(emb), generator=gen)
        for start in range(0, len(perm), cfg.batch_size):
            b = perm[start : start + cfg.batch_size]
            log_w = torch.log_softmax(head.logits(emb[b]), dim=-1)
            loss = nll(log_w, logp[b], mask[b], ans[b]) / cfg.accumulation
            loss.backward()
            micro += 1
            if micro % cfg.accumulation:
                continue
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            if steps % cfg.eval_every:
                continue
            head.eval()
            with torch.no_grad():
                v = float(nll(torch.log_softmax(head.logits(v_emb), -1), v_logp, v_mask, v_ans))
            head.train()
            sched.step(v)
            history.append({"step": steps, "val_loss": v, "lr": opt.param_groups[0]["lr"]})
            if best == math.inf or v < best - max(cfg.min_delta * abs(best), 1e-9):
                best, best_state, stale = v, copy.deepcopy(head.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.early_stop:
                    stop = True
                    break
        if stop:
            break
    if history:  # else too little data for one evaluation: keep the last state
        head.load_state_dict(best_state)
    head.eval()
    return TrainResult(
        head=head,
        config=cfg,
        train=report(tr, gate_values(head, tr.emb)),
        val=report(va, gate_values(head, va.emb)),
        history=history,
        epochs=epoch,
        steps=steps,
        seconds=time.perf_counter() - t0,
    )
