"""LoRA fine-tuning of a base model on one cluster's data (paper Appendix A, Table V).

Bounded (``max_steps``, ``max_seconds``), resumable (a checkpoint of the LoRA weights,
optimizer, schedule and RNG every ``checkpoint_every`` optimizer steps: a re-run continues
where the last one stopped and reaches the same weights), on the GPU when there is one.

    model, tok = base.load(ref)
    examples = tokenize(tok, [("Question: ...\\nAnswer:", " Paris"), ...], cfg)
    result = finetune(model, examples, cfg, workdir=Path("ckpt/c0"))
    model = unwrap(result.model)                      # the base again, for the next expert
    write_adapter(path, result.pairs, meta, n_head=ref.n_head, n_head_kv=ref.n_head_kv)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from moe2.controller.experts.base import Tokenizer
from moe2.controller.experts.lora_gguf import TARGET_MODULES, LoraPair
from moe2.shared.errors import ConfigError

IGNORE = -100  # label of a token the loss skips (torch cross_entropy's ignore_index)
CHECKPOINT_FORMAT = 2  # bump when batching or the loss change: old checkpoints must not resume


class FinetuneConfig(BaseModel):
    """Table V of the paper as defaults; every field is a ``moe2ctl experts finetune`` flag.
    The paper tuned 3-7B models on 8 GPUs: on a CPU pick a small rank, a larger learning
    rate and ``max_steps``/``max_seconds`` (see bench/bench_experts.py)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=256, ge=1, le=4096, description="LoRA rank r")
    alpha: int = Field(default=512, ge=1, description="LoRA alpha (scale alpha/r)")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout")
    targets: str = Field(
        default=",".join(TARGET_MODULES),
        description="modules to adapt, comma-separated",
    )
    lr: float = Field(default=5e-5, gt=0, description="initial learning rate (AdamW)")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    epochs: float = Field(default=3.0, gt=0, description="passes over the cluster's data")
    batch_size: int = Field(default=8, ge=1, le=4096, description="sequences per micro-batch")
    accumulation: int = Field(
        default=16, ge=1, le=4096, description="micro-batches per optimizer step"
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="gradient clipping norm")
    cutoff_len: int = Field(
        default=8192, ge=8, description="longest sequence in tokens (prompt cut from the left)"
    )
    loss_on: Literal["answer", "all"] = Field(
        default="answer",
        description="train on the answer tokens only (supervised fine-tuning) or on all",
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="stop after this many optimizer steps"
    )
    max_seconds: float | None = Field(
        default=None, gt=0, description="stop (with a checkpoint) after this many seconds"
    )
    checkpoint_every: int = Field(
        default=10, ge=1, description="optimizer steps between checkpoints"
    )
    seed: int = Field(default=0, description="data order, LoRA initialisation, dropout")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: the GPU when torch sees one"
    )
    threads: int = Field(default=0, ge=0, le=1024, description="CPU threads (0: all cores)")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: str) -> str:
        names = [t.strip() for t in v.split(",") if t.strip()]
        bad = [t for t in names if t not in TARGET_MODULES]
        if not names or bad:
            raise ValueError(
                f"unknown LoRA target(s) {bad or v!r}; expected some of {', '.join(TARGET_MODULES)}"
            )
        return ",".join(names)

    def target_list(self) -> list[str]:
        return self.targets.split(",")

    def planned_steps(self, n_examples: int) -> int:
        """Optimizer steps of the cosine schedule: the epochs, capped by ``max_steps``."""
        per_step = self.batch_size * self.accumulation
        steps = max(1, math.ceil(self.epochs * n_examples / per_step))
        return min(steps, self.max_steps) if self.max_steps else steps

    def fingerprint(self) -> str:
        """What a checkpoint must agree with to be resumed (the stopping bounds may change)."""
        keep = self.model_dump(exclude={"max_seconds", "checkpoint_every", "device", "threads"})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    ids: list[int]  # prompt then answer token ids
    labels: list[int]  # the ids, IGNORE where no loss is taken


def answer_pairs(samples: Sequence[Any]) -> list[tuple[str, str]]:
    """(prompt, correct answer) of dataset samples (``datasets.Sample``, ``SampleRow``):
    the option marked correct of a multiple-choice sample, the target of a free answer."""
    return [(s.prompt, s.targets[s.answer]) for s in samples]


def tokenize(
    tok: Tokenizer, pairs: Sequence[tuple[str, str]], cfg: FinetuneConfig
) -> list[Example]:
    """(prompt, answer) texts -> examples. The prompt is tokenized as a prompt (BOS where the
    model wants one) and the answer on its own, exactly as an agent scores a target after a
    prompt, so training and serving see the same token ids."""
    out = []
    for prompt, answer in pairs:
        p = tok.encode(prompt, bos=True)
        a = tok.encode(answer, bos=False)
        if not a:
            continue
        a = a[: cfg.cutoff_len - 1]
        p = p[-(cfg.cutoff_len - len(a)) :]  # keep the end of a long prompt
        labels = ([IGNORE] * len(p) if cfg.loss_on == "answer" else list(p)) + a
        out.append(Example(p + a, labels))
    if not out:
        raise ConfigError("no training examples: every answer tokenizes to nothing")
    return out


def examples_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, e.labels]).encode())
    return h.hexdigest()[:16]


def run_identity(cfg: FinetuneConfig, examples: Sequence[Example]) -> dict[str, Any]:
    """What a training run is: a checkpoint resumes, and a finished adapter is reused, only
    when this agrees (format, settings that change the weights, data, planned steps)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.fingerprint(),
        "data": examples_hash(examples),
        "planned": cfg.planned_steps(len(examples)),
    }


def _batch(examples: Sequence[Example], pad_id: int, device: str) -> dict[str, Any]:
    """Left-padded (batch, longest) tensors with explicit positions. Left padding lines the
    answers up at the end of every row, so the answer-only loss needs the logits of the last
    few positions alone (the vocabulary projection dominates a small model's cost)."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, width - n :] = torch.tensor(e.ids)
        labels[i, width - n :] = torch.tensor(e.labels)
        mask[i, width - n :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts from 0 at its first token
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


def batch_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """(summed NLL of the labelled tokens (a torch scalar), their count) of a ``_batch``.
    Logits are computed only from the first position that predicts a labelled token on."""
    import torch

    labels = batch["labels"]  # (batch, width)
    width = labels.shape[1]
    labelled = (labels[:, 1:] != IGNORE).any(0).nonzero()
    if len(labelled) == 0:
        return torch.zeros((), device=labels.device), 0
    first = int(labelled[0])  # earliest position whose next token is labelled
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=width - first,  # positions first .. width-1
    )
    logits = out.logits[:, :-1]  # (batch, width-first-1, vocab) predicting first+1 .. width-1
    target = labels[:, first + 1 :]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll, int((target != IGNORE).sum())


def epoch_batches(
    examples: Sequence[Example], batch_size: int, seed: Sequence[int], window: int = 16
) -> list[list[int]]:
    """One epoch of micro-batches (indices into ``examples``), each example once. A batch is
    padded to its longest sequence, so examples are shuffled, sorted by length within windows
    of ``window`` batches, cut into batches, and the batches shuffled: with MMLU's spread of
    lengths a third fewer tokens go through the model than with plain shuffling."""
    rng = np.random.default_rng(list(seed))
    order = rng.permutation(len(examples))
    span = batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda j: len(examples[j].ids))
        batches += [
            [int(j) for j in chunk[k : k + batch_size]] for k in range(0, len(chunk), batch_size)
        ]
    return [batches[i] for i in rng.permutation(len(batches))]


def resolve_device(setting: str) -> str:
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def mean_loss(model: Any, examples: Sequence[Example], batch_size: int = 8) -> float:
    """Mean negative log-likelihood per labelled token (nats) of ``examples``."""
    import torch

    device = str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
        for s in range(0, len(order), batch_size):
            nll, n = batch_nll(
                model, _batch([examples[i] for i in order[s : s + batch_size]], 0, device)
            )
            total += float(nll)
            count += n
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class FinetuneResult:
    model: Any  # the peft-wrapped model (evaluate it, then ``unwrap`` it)
    pairs: dict[str, LoraPair]  # Hugging Face module name -> (A, B)
    steps: int  # optimizer steps done in total (over resumed runs)
    planned_steps: int
    stopped: Literal["done", "max_seconds"]
    seconds: float  # this run's wall time
    history: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr
    resumed_from: int = 0

    @property
    def finished(self) -> bool:
        return self.steps >= self.planned_steps


Progress = Callable[[int, int, float], None]  # (step, planned, loss)


def finetune(
    model: Any,
    examples: Sequence[Example],
    cfg: FinetuneConfig,
    workdir: Path,
    *,
    pad_id: int = 0,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train LoRA adapters on ``model`` and return their weights. peft injects the LoRA
    layers into ``model`` in place: ``unwrap(result.model)`` gives the plain base back.
    Resumes from ``workdir/checkpoint.pt`` when it matches config and data."""
    import torch
    from peft import LoraConfig, get_peft_model

    if not examples:
        raise ConfigError("no training examples")
    t0 = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = str(next(model.parameters()).device)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        # peft asks transformers 5 for an attribute it deprecated; nothing for us to change.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=cfg.target_list(),
                bias="none",
            ),
        )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    planned = cfg.planned_steps(len(examples))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=planned)
    identity = run_identity(cfg, examples)

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    step, history = 0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=device)
        if ck["identity"] != identity:
            raise ConfigError(
                f"{ckpt_path} was made with other settings or data; delete it (or pass "
                "--restart) to start this expert again"
            )
        trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        for n, value in ck["lora"].items():
            trainable[n].data.copy_(value)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        step, history = int(ck["step"]), list(ck["history"])
    resumed_from = step

    def save() -> None:
        state = {
            "identity": identity,
            "step": step,
            "history": history,
            "lora": {
                n: p.detach().cpu() for n, p in peft_model.named_parameters() if p.requires_grad
            },
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
        }
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)

    # A resumed run must read the same micro-batches: micro-batch m is batch m % per_epoch of
    # epoch m // per_epoch, and each epoch's batches are a pure function of (seed, epoch).
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    epochs: dict[int, list[list[int]]] = {}

    def micro_batch(m: int) -> list[Example]:
        epoch, i = divmod(m, per_epoch)
        if epoch not in epochs:
            epochs[epoch] = epoch_batches(examples, cfg.batch_size, [cfg.seed, epoch])
        return [examples[j] for j in epochs[epoch][i]]

    stopped: Literal["done", "max_seconds"] = "done"
    peft_model.train()
    while step < planned:
        if cfg.max_seconds is not None and time.monotonic() - t0 > cfg.max_seconds:
            stopped = "max_seconds"
            break
        total = 0.0
        for j in range(cfg.accumulation):
            b = _batch(micro_batch(step * cfg.accumulation + j), pad_id, device)
            nll, n = batch_nll(peft_model, b)
            loss = nll / max(n, 1) / cfg.accumulation  # mean per labelled token, as HF does
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = float(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append({"step": step, "loss": round(total, 5), "lr": lr})
        if progress is not None:
            progress(step, planned, total)
        if step % cfg.checkpoint_every == 0 or step == planned:
            save()
    if stopped != "done" and step > resumed_from:
        save()
    peft_model.eval()
    return FinetuneResult(
        model=peft_model,
        pairs=lora_pairs(peft_model),
        steps=step,
        planned_steps=planned,
        stopped=stopped,
        seconds=time.monotonic() - t0,
        history=history,
        resumed_from=resumed_from,
    )


def lora_pairs(peft_model: Any) -> dict[str, LoraPair]:
    """{module name: (A, B)} of every LoRA layer, as float32 numpy (rank, in), (out, rank)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in peft_model.named_modules():
        module: Any = layer  # peft's LoraLayer attributes are not typed as modules
        if isinstance(layer, LoraLayer) and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().float().cpu().numpy()
            b = module.lora_B["default"].weight.detach().float().cpu().numpy()
            out[name] = LoraPair(a, b)
    return out


def unwrap(model: Any) -> Any:
    """The base model without its LoRA layers (after ``finetune``), ready for the next
    expert: peft injects the layers in place and ``unload`` takes them out again."""
    from peft import PeftModel

    return model.unload() if isinstance(model, PeftModel) else model
