"""Gate training on stored scores (docs/method.md, "The loss"; eq. 13), and its evaluation.

Teacher forcing makes p_{n,t} independent of θ, so training needs only the stored target
log-probabilities and the prompts' embeddings: (samples, options, experts, units) arrays in the
units of the one mixing rule (``moe2.controller.mixing``), a few seconds of torch.

The samples are split three ways, by a seeded hash of each sample's position in its dataset
(stable when more samples are scored): the gate learns on *train*; early stopping and the
learning-rate scheduler watch *val*; *test* is never seen by either and is reported apart
(and is what ``moe2ctl eval`` evaluates on by default).

    cfg = TrainConfig()
    data = TrainData.build(table, embeddings)
    result = train(data, cfg)        # result.head, result.metrics()
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
from moe2.controller.mixing import Mixed, mix, normalise
from moe2.controller.registry import ScoreTable
from moe2.controller.splits import Split, split


@dataclass
class TrainData:
    """The scores in mixing units (``mixed``) and the prompts' embeddings, sample-aligned."""

    mixed: Mixed
    emb: np.ndarray  # (samples, dim) float32

    @classmethod
    def build(cls, table: ScoreTable, emb: np.ndarray, dataset: str = "") -> TrainData:
        return cls(mix(table, dataset), np.asarray(emb, dtype=np.float32))

    @property
    def experts(self) -> list[str]:
        return self.mixed.experts

    @property
    def apps(self) -> list[str]:
        return self.mixed.apps

    @property
    def answer(self) -> np.ndarray:
        return self.mixed.answer

    def subset(self, idx: np.ndarray) -> TrainData:
        return TrainData(self.mixed.select(idx), self.emb[idx])


def option_loglik(log_w: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_u log Σ_n ω_n p_{n,u} for each option, in torch for the gradient: log_w (batch,
    experts), logp (batch, options, experts, units), mask (batch, options, units) -> (batch,
    options). The same formula as ``Mixed.option_loglik`` (numpy), which every report uses."""
    mixed = torch.logsumexp(log_w[:, None, :, None] + logp, dim=2)  # (batch, options, units)
    return (mixed * mask).sum(-1)


def nll(
    log_w: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor
) -> torch.Tensor:
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
    """Loss and accuracy under (samples, experts) log weights, in float64 through the one
    mixing rule: the loss here is J(N) of the optimizer on the same samples and gate."""
    m = data.mixed
    ll = m.option_loglik(np.asarray(log_w, dtype=np.float64))  # (samples, options)
    n = np.arange(m.n_samples)
    correct = ll[n, m.answer]
    units = m.mask[n, m.answer].sum()
    acc = None
    if (m.n_options > 1).any():
        acc = float((ll.argmax(1) == m.answer).mean())
    return Scores(float(-correct.mean()), float(-correct.sum() / max(units, 1)), acc)


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
    m = data.mixed
    oracle = (m.logp[np.arange(m.n_samples), m.answer].sum(-1)).argmax(-1)
    routing = float((gate_values.argmax(1) == oracle).mean())
    gate = evaluate_weights(data, np.log(normalise(gate_values)))
    return Report(gate, uniform, singles, best, routing)


@dataclass
class TrainResult:
    head: GateHead
    config: TrainConfig
    split: Split
    sample_idx: np.ndarray  # (samples,) dataset position of each sample of the data
    train: Report
    val: Report
    test: Report | None  # None when the test fraction is 0
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped: str = ""  # "early stop" | "max epochs"

    def metrics(self) -> dict[str, Any]:
        return {
            "train": self.train.as_dict(),
            "val": self.val.as_dict(),
            "test": None if self.test is None else self.test.as_dict(),
            "split": self.split.as_dict(self.sample_idx),
            "epochs": self.epochs,
            "steps": self.steps,
            "lr_decays": sum(
                1 for a, b in zip(self.history, self.history[1:]) if b["lr"] < a["lr"]
            ),
            "final_lr": self.history[-1]["lr"] if self.history else self.config.lr,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
        }


@torch.no_grad()
def gate_values(head: GateHead, emb: np.ndarray) -> np.ndarray:
    head.eval()
    return head(torch.as_tensor(emb, dtype=torch.float32)).double().numpy()


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
    parts = split(data.mixed.sample_idx, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    tr, va = data.subset(parts.train), data.subset(parts.val)
    head = GateHead(data.emb.shape[1], len(data.experts), cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The same notion of "improved" as early stopping (relative min_delta), so that with
    # plateau_patience < early_stop the learning rate decays before training stops.
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt,
        factor=cfg.plateau_factor,
        patience=cfg.plateau_patience,
        threshold=cfg.min_delta,
        threshold_mode="rel",
    )
    emb = torch.as_tensor(tr.emb)
    logp = torch.as_tensor(tr.mixed.logp, dtype=torch.float32)
    mask = torch.as_tensor(tr.mixed.mask)
    ans = torch.as_tensor(tr.answer)
    v_emb = torch.as_tensor(va.emb)
    v_logp = torch.as_tensor(va.mixed.logp, dtype=torch.float32)
    v_mask, v_ans = torch.as_tensor(va.mixed.mask), torch.as_tensor(va.answer)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, stale, steps, micro = math.inf, copy.deepcopy(head.state_dict()), 0, 0, 0
    history: list[dict[str, float]] = []
    epoch = 0
    stopped = "max epochs"
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
                    stopped = "early stop"
                    break
        if stopped == "early stop":
            break
    if history:  # else too little data for one evaluation: keep the last state
        head.load_state_dict(best_state)
    head.eval()
    te = data.subset(parts.test) if parts.test.size else None
    return TrainResult(
        head=head,
        config=cfg,
        split=parts,
        sample_idx=data.mixed.sample_idx,
        train=report(tr, gate_values(head, tr.emb)),
        val=report(va, gate_values(head, va.emb)),
        test=None if te is None else report(te, gate_values(head, te.emb)),
        history=history,
        epochs=epoch,
        steps=steps,
        seconds=time.perf_counter() - t0,
        stopped=stopped,
    )
