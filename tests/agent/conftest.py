from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend


@pytest.fixture(scope="session")
def animals_backend(tiny_models: dict[str, Path]) -> Iterator[LlamaCppBackend]:
    b = LlamaCppBackend(AgentConfig(model=tiny_models["animals"], n_threads=1))
    yield b
    b.close()
