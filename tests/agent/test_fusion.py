"""Fusion on bytes (pure logic): byte tokens align only with the same bytes."""

from __future__ import annotations

import codecs
import math

import numpy as np

from moe2.agent.gateway.fusion import END, fuse_by_text
from moe2.shared import protocol as p


def topk(ids: list[int], probs: list[float]) -> p.TopKDist:
    return p.TopKDist(ids=ids, logprobs=[math.log(x) for x in probs], tail=1 - sum(probs))


def test_partial_utf8_byte_tokens_are_never_merged_with_other_bytes() -> None:
    # Expert a spells "é" whole; expert b has only the two byte tokens of its UTF-8 form,
    # and a third, unrelated byte token. Decoded with errors="replace", all three of b's
    # byte tokens would read U+FFFD and be summed under one key.
    pieces = {
        "a": [b"\xc3\xa9", b" the", b""],
        "b": [b"\xc3", b"\xa9", b"\xe2", b" the", b"</s>"],
    }
    dists = {"a": topk([0, 1], [0.6, 0.3]), "b": topk([0, 2, 3], [0.3, 0.3, 0.3])}
    fused = fuse_by_text(dists, {"a": 0.5, "b": 0.5}, pieces, {"a": [2], "b": [4]})
    got = dict(zip(fused.keys, fused.probs))
    assert got[b"\xc3\xa9"] == 0.3 and got[b"\xc3"] == 0.15 and got[b"\xe2"] == 0.15
    assert got[b" the"] == 0.3  # the same text from both vocabularies is summed
    assert all(isinstance(k, bytes) for k in got)
    # end-of-generation tokens of both experts share one key
    dists = {"a": topk([2, 1], [0.5, 0.4]), "b": topk([4], [0.9])}
    fused = fuse_by_text(dists, {"a": 0.5, "b": 0.5}, pieces, {"a": [2], "b": [4]})
    got = dict(zip(fused.keys, fused.probs))
    assert np.isclose(got[END], 0.7)


def test_a_character_split_over_byte_tokens_streams_whole() -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chunks = [decoder.decode(b) for b in (b"caf", b"\xc3", b"\xa9", b" \xf0\x9f", b"\x8e\x89")]
    assert chunks == ["caf", "", "é", " ", "🎉"]
