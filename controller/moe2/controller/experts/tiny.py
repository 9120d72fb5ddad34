"""Tiny llama-architecture GGUF experts, built in well under a second each.

All tiny experts share one vocabulary (whole-word SentencePiece pieces over the synthetic
domains' words, plus byte fallback), so they can be fused by token id. Each is trained on
one domain: the maximum-likelihood bigram model of that domain's corpus (smoothed so no text
is impossible; nothing is learned from the other domains), stored as a rank-``n_embd-1``
factorisation in the token embedding and output matrices. Small random attention and
feed-forward layers sit in between, so the next-token distribution depends (slightly) on the
whole history and the KV cache matters, as it does in a real model.

    paths = build_experts(Path("models"), ["arithmetic", "code"])
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from moe2.controller.experts.domains import DOMAINS, all_words, corpus

SPACE = "\u2581"  # SentencePiece's word-boundary marker
UNK, BOS, EOS = 0, 1, 2

# gguf token types
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


@dataclass(frozen=True)
class Vocab:
    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    index: dict[str, int] = field(compare=False, hash=False)

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of space-separated domain text, as llama.cpp's tokenizer gives them."""
        ids = [BOS] if bos else []
        for word in text.split(" "):
            if word:
                ids.append(self.index[SPACE + word])
        return ids


@cache
def shared_vocab() -> Vocab:
    """The one vocabulary every tiny expert uses (deterministic)."""
    return build_vocab(tuple(all_words()))


def build_vocab(words: tuple[str, ...]) -> Vocab:
    """Special tokens, byte fallback, single characters, then every prefix of "▁word"."""
    pieces: list[str] = ["<unk>", "<s>", "</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    chars = sorted({c for w in words for c in w} | {SPACE})
    pieces += chars
    types += [_NORMAL] * len(chars)
    # Every prefix of "▁word": SentencePiece merges left to right through them, so each
    # known word becomes exactly one token.
    prefixes = sorted({SPACE + w[:i] for w in words for i in range(1, len(w) + 1)} - set(chars))
    pieces += prefixes
    types += [_NORMAL] * len(prefixes)
    # Longer pieces win merges; control and byte tokens never take part.
    scores = [0.0 if t != _NORMAL else float(len(p)) for p, t in zip(pieces, types)]
    return Vocab(tuple(pieces), tuple(scores), tuple(types), {p: i for i, p in enumerate(pieces)})


def vocab_hash(vocab: Vocab) -> str:
    return hashlib.sha256("\x00".join(vocab.pieces).encode()).hexdigest()


@dataclass(frozen=True)
class TinySpec:
    n_embd: int = 128
    n_head: int = 4
    n_layer: int = 2
    n_ff: int = 256
    n_ctx: int = 4096
    sentences: int = 3000  # training sentences from the expert's own domain
    mix: float = 0.0  # weight of the other domains' text (0: an expert knows only its domain)
    attn_scale: float = 0.08  # size of the random layers relative to the bigram signal


def bigram_logprobs(vocab: Vocab, domain: str, spec: TinySpec, seed: int = 0) -> np.ndarray:
    """(n_vocab, n_vocab) log p(next | previous), trained on ``domain`` text."""
    n = len(vocab)
    counts = np.zeros((n, n), dtype=np.float64)

    def add(sentences: Iterable[str], weight: float) -> None:
        for s in sentences:
            ids = [*vocab.encode(s), EOS]
            np.add.at(counts, (ids[:-1], ids[1:]), weight)

    add(corpus(domain, spec.sentences, seed), 1.0)
    if spec.mix > 0:
        per_other = max(1, int(spec.sentences * spec.mix))
        for d in DOMAINS:
            if d != domain:
                add(corpus(d, per_other, seed + 1), 1.0)
    counts += 1e-2  # every token stays possible; unseen contexts get a flat distribution
    counts[:, BOS] = 0.0  # BOS never follows anything
    counts[:, BOS] += 1e-12
    return np.log(counts / counts.sum(axis=1, keepdims=True))


def write_expert(
    path: Path,
    domain: str,
    spec: TinySpec = TinySpec(),
    seed: int = 0,
    vocab: Vocab | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write one expert trained on ``domain``; ``vocab`` defaults to the shared one (only
    experts with the same vocabulary can be fused by token id). ``chat_template`` (Jinja, as
    Hugging Face models carry it) is stored as ``tokenizer.chat_template``; none by default."""
    import gguf  # build-time only dependency

    vocab = vocab or shared_vocab()
    n_vocab, d = len(vocab), spec.n_embd
    rng = np.random.default_rng(
        int.from_bytes(hashlib.sha256(f"{domain}:{seed}".encode()).digest()[:8], "little")
    )

    # Rank-(d-1) factorisation of the row-centred log-probability matrix: logits(x) = B·A[x].
    logp = bigram_logprobs(vocab, domain, spec, seed)
    logp -= logp.mean(axis=1, keepdims=True)  # softmax ignores a per-row shift
    u, s, vt = np.linalg.svd(logp, full_matrices=False)
    r = d - 1
    a = u[:, :r] * s[:r]  # (n_vocab, r)
    b = vt[:r].T  # (n_vocab, r)
    # RMSNorm rescales each embedding row to norm sqrt(d); give every row the same norm c
    # with one padding coordinate, so the scaling is the same constant for all tokens.
    norms = np.linalg.norm(a, axis=1)
    c = float(norms.max()) * 1.001
    emb = np.concatenate([a, np.sqrt(c * c - norms[:, None] ** 2)], axis=1) / c  # unit rows
    out = np.concatenate([b, np.zeros((n_vocab, 1))], axis=1) * (c / np.sqrt(d))

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"moe2-tiny-{domain}")
    writer.add_description(f"moe2 tiny expert trained on the synthetic '{domain}' domain")
    writer.add_context_length(spec.n_ctx)
    writer.add_embedding_length(d)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head)
    writer.add_rope_dimension_count(d // spec.n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocab.pieces))
    writer.add_token_scores(list(vocab.scores))
    writer.add_token_types(list(vocab.types))
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    f32 = np.float32
    writer.add_tensor("token_embd.weight", emb.astype(f32))  # (n_vocab, d)
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=f32))
    writer.add_tensor("output.weight", out.astype(f32))  # (n_vocab, d)
    sd = spec.attn_scale
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(d, dtype=f32))
        writer.add_tensor(p + "attn_q.weight", rng.normal(0, 1.2 / np.sqrt(d), (d, d)).astype(f32))
        writer.add_tensor(p + "attn_k.weight", rng.normal(0, 1.2 / np.sqrt(d), (d, d)).astype(f32))
        writer.add_tensor(p + "attn_v.weight", rng.normal(0, 1 / d, (d, d)).astype(f32))
        writer.add_tensor(
            p + "attn_output.weight", rng.normal(0, sd / np.sqrt(d), (d, d)).astype(f32)
        )
        writer.add_tensor(p + "ffn_norm.weight", np.ones(d, dtype=f32))
        writer.add_tensor(
            p + "ffn_gate.weight", rng.normal(0, 1 / np.sqrt(d), (spec.n_ff, d)).astype(f32)
        )
        writer.add_tensor(
            p + "ffn_up.weight", rng.normal(0, 1 / np.sqrt(d), (spec.n_ff, d)).astype(f32)
        )
        writer.add_tensor(
            p + "ffn_down.weight", rng.normal(0, sd / spec.n_ff, (d, spec.n_ff)).astype(f32)
        )

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_experts(
    out_dir: Path, domains: Sequence[str] | None = None, spec: TinySpec = TinySpec(), seed: int = 0
) -> dict[str, Path]:
    """Write one expert per domain into ``out_dir``; returns {domain: path}."""
    names = list(domains) if domains else list(DOMAINS)
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; expected some of {', '.join(DOMAINS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return {n: write_expert(out_dir / f"tiny-{n}.gguf", n, spec, seed) for n in names}
