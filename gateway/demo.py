"""``distill-gateway demo``: the gateway on its embedded defaults, no API key needed.

A local OpenAI-compatible teacher (gateway.testing.teacher_server) stands in for the
provider; the gateway serves a ``support-intents`` classify task in front of it, the
official ``openai`` client sends a few requests, and the gateway keeps serving so you can
try it yourself. (The replay of recorded GPT answers with live distillation comes with
the student and loop.)
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn
from rich.console import Console
from rich.table import Table

from gateway.app import create_app
from gateway.config import load_settings
from gateway.testing.teacher_server import TeacherServer

LABELS = ["card_arrival", "card_linking", "exchange_rate", "lost_or_stolen_card", "other"]
QUESTIONS = [
    "I ordered my card a week ago and it still has not arrived.",
    "How do I link my new card to the app?",
    "What exchange rate do you use for euros?",
    "Someone stole my wallet with my card in it!",
    "Can you tell me a joke?",
    "When will my card get here?",
    "Is the exchange rate better on weekends?",
    "I can't add my card in the app",
]


def _keyword_teacher(body: dict[str, Any]) -> str:
    text = str(body["messages"][-1].get("content", "")).lower()
    for word, label in (
        ("arriv", "card_arrival"),
        ("get here", "card_arrival"),
        ("link", "card_linking"),
        ("add my card", "card_linking"),
        ("exchange", "exchange_rate"),
        ("stole", "lost_or_stolen_card"),
    ):
        if word in text:
            return label
    return "other"


def run_demo(requests: int = 8, port: int = 8000, keep_serving: bool = True) -> None:
    import openai

    console = Console()
    teacher = TeacherServer(responder=_keyword_teacher).start()
    settings = load_settings(
        None,
        default_teacher={
            "model": "openai/demo-teacher",
            "api_base": teacher.url,
            "api_key": "demo",
            "price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
        },
        tasks={"support-intents": {"plugin": "classify", "options": {"labels": LABELS}}},
    )
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(f"the gateway could not start on port {port}")
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}/v1"
    console.print(
        f"[bold]distill-gateway[/bold] on {base_url}   metrics: "
        f"http://127.0.0.1:{port}/metrics   database: {settings.database}"
    )
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    table = Table(title="requests through the gateway")
    for column in ("question", "answer", "served by", "cost (USD)", "ms"):
        table.add_column(column)
    for i in range(requests):
        question = QUESTIONS[i % len(QUESTIONS)]
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model="support-intents",
            messages=[
                {"role": "system", "content": "Answer with one intent label."},
                {"role": "user", "content": question},
            ],
        )
        completion = raw.parse()
        table.add_row(
            question,
            completion.choices[0].message.content or "",
            raw.headers["x-distill-served-by"],
            raw.headers["x-distill-cost-usd"],
            f"{(time.perf_counter() - started) * 1000:.1f}",
        )
    console.print(table)
    store = app.state.runtime.store
    store.flush()
    console.print(f"recorded exchanges in the store: {store.count(task='support-intents')}")
    try:
        if keep_serving:
            console.print("serving; try it with the openai client. Ctrl-C to stop.")
            while thread.is_alive():
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(timeout=35)
        teacher.stop()
