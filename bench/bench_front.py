"""Serving benchmark (issue 14): what the embedded broker and the OpenAI-compatible front cost.

* per-token latency of a gateway fusing two tiny experts (k=2), on mosquitto and on the
  embedded broker (iotcore's rumqttd), median over prompts of latency / tokens;
* one prompt answered through the MQTT prompt API (PromptClient), through moe2-http with the
  official openai client (non-streamed), and streamed (time to the first delta and total),
  medians over prompts, on mosquitto;
* rendering a conversation with a chat template vs tokenizing the plain prompt (agent side).

  python bench/bench_front.py [--prompts 10] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe2.controller.experts.tiny import build_experts, write_expert
from moe2.controller.localfleet import LocalFleet
from moe2.shared.broker import free_port, start_broker, wait_for_port
from moe2.shared.client import PromptClient
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.protocol import ChatMessage

PROMPT = "the fox eats"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def per_token_ms(kind: str, models: dict[str, Path], n: int, tokens: int) -> tuple[float, int]:
    with start_broker(kind) as b, tempfile.TemporaryDirectory() as tmp:
        cfg = BrokerConfig(host=b.host, port=b.port)
        with LocalFleet(cfg, Path(tmp)) as fleet:
            fleet.start("a", models["animals"], "--n-threads", "1")
            fleet.start("b", models["code"], "--n-threads", "1", "--serve-app", "d=a,b:2")
            fleet.wait_online(["a", "b"], 60)
            with PromptClient(cfg) as c:
                c.ask("d", "3 plus 4", max_tokens=tokens)  # warm-up
                per, counts = [], []
                for _ in range(n):
                    ans = c.ask("d", "3 plus 4", max_tokens=tokens)
                    per.append(ans.latency_ms / max(ans.tokens, 1))
                    counts.append(ans.tokens)
            return med(per), int(med(counts))


def front_figures(models: dict[str, Path], n: int, tokens: int) -> dict[str, float]:
    import openai

    out: dict[str, float] = {}
    with start_broker("mosquitto") as b, tempfile.TemporaryDirectory() as tmp:
        cfg = BrokerConfig(host=b.host, port=b.port)
        with LocalFleet(cfg, Path(tmp)) as fleet:
            fleet.start("a", models["animals"], "--n-threads", "1")
            fleet.start("b", models["code"], "--n-threads", "1", "--serve-app", "d=a,b:2")
            fleet.wait_online(["a", "b"], 60)
            port = free_port()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from moe2.controller.openai.cli import main; main()",
                    "--port",
                    str(port),
                    "--no-auth",
                    "--broker-port",
                    str(b.port),
                    "--log-level",
                    "warning",
                ],
            )
            try:
                wait_for_port("127.0.0.1", port, 30)
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
                msgs = [{"role": "user", "content": PROMPT}]
                conv = [ChatMessage(role="user", content=PROMPT)]
                with PromptClient(cfg) as pc:
                    pc.ask("d", conv, max_tokens=tokens)
                    mqtt_ms = []
                    for _ in range(n):
                        t = time.perf_counter()
                        pc.ask("d", conv, max_tokens=tokens)
                        mqtt_ms.append((time.perf_counter() - t) * 1e3)
                client.chat.completions.create(model="d", messages=msgs, max_tokens=tokens)
                http_ms, first_ms, stream_ms = [], [], []
                for _ in range(n):
                    t = time.perf_counter()
                    client.chat.completions.create(model="d", messages=msgs, max_tokens=tokens)
                    http_ms.append((time.perf_counter() - t) * 1e3)
                    t = time.perf_counter()
                    first = None
                    for chunk in client.chat.completions.create(
                        model="d", messages=msgs, max_tokens=tokens, stream=True
                    ):
                        if first is None and chunk.choices and chunk.choices[0].delta.content:
                            first = (time.perf_counter() - t) * 1e3
                    stream_ms.append((time.perf_counter() - t) * 1e3)
                    first_ms.append(first or float("nan"))
            finally:
                proc.terminate()
                proc.wait(10)
    out["mqtt"] = med(mqtt_ms)
    out["http"] = med(http_ms)
    out["stream_first"] = med(first_ms)
    out["stream_total"] = med(stream_ms)
    return out


def render_figures(tmp: Path, n: int) -> tuple[float, float]:
    from moe2.agent.chat import ChatRenderer
    from moe2.agent.config import AgentConfig
    from moe2.agent.llama import LlamaCppBackend

    tmpl = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write_expert(tmp / "templated.gguf", "animals", chat_template=tmpl)
    backend = LlamaCppBackend(AgentConfig(model=path, n_threads=1))
    chat = ChatRenderer(backend)
    conv = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content=PROMPT),
    ]
    plain, templated = [], []
    for _ in range(n):
        t = time.perf_counter()
        backend.tokenize(PROMPT, add_bos=True)
        plain.append((time.perf_counter() - t) * 1e6)
        t = time.perf_counter()
        chat.tokens(conv)
        templated.append((time.perf_counter() - t) * 1e6)
    backend.close()
    return med(plain), med(templated)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = build_experts(Path(tmp) / "tiny", ["animals", "code", "arithmetic"])
        mosq, n_tok = per_token_ms("mosquitto", models, args.prompts, args.tokens)
        emb, _ = per_token_ms("iotcore", models, args.prompts, args.tokens)
        front = front_figures(models, args.prompts, args.tokens)
        plain_us, tmpl_us = render_figures(Path(tmp), 200)
    print(
        f"\nmedians over {args.prompts} prompts, {args.tokens} tokens max, two tiny experts "
        "fused k=2, loopback\n"
    )
    print("| what | figure |")
    print("|---|---|")
    print(f"| per token, mosquitto ({n_tok} tokens per answer) | {mosq:.1f} ms |")
    print(f"| per token, embedded broker (iotcore/rumqttd) | {emb:.1f} ms ({emb / mosq:.1f}x) |")
    print(f"| one chat prompt, MQTT prompt API (PromptClient) | {front['mqtt']:.1f} ms |")
    print(
        f"| the same through moe2-http, openai client | {front['http']:.1f} ms "
        f"(+{front['http'] - front['mqtt']:.1f} ms) |"
    )
    print(
        f"| streamed through moe2-http: first delta / whole | {front['stream_first']:.1f} / "
        f"{front['stream_total']:.1f} ms |"
    )
    print(
        f"| tokenize a plain prompt / render + tokenize a 2-turn chat (agent) | "
        f"{plain_us:.0f} / {tmpl_us:.0f} µs |"
    )


if __name__ == "__main__":
    main()
