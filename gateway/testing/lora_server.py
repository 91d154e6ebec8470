"""A small stand-in for vLLM's OpenAI-compatible server with LoRA adapters, for tests.

It speaks the part of vLLM's API that a remote ``lora-lm`` student uses, with vLLM's
semantics: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
(``{"lora_name", "lora_path"}``; loading a name twice is a 400 that says "has already
been loaded"), ``POST /v1/completions`` (``prompt`` as text, token ids or a list of
either; ``model`` the base or an adapter's name; greedy only; ``logprobs``,
``stop_token_ids``, ``return_tokens_as_token_ids``; the stop token is among the output
tokens and their log-probabilities but not in the text) and ``GET /v1/models``.
Generation runs with transformers and peft on the CPU, one prompt at a time: correct,
not fast.

Run in the foreground::

    python -m gateway.testing.lora_server --model PATH [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LoraServer", "main"]


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LoraServer:
    """Serves ``model`` (a Hugging Face checkpoint directory) and the adapters loaded into
    it on 127.0.0.1 in a background thread; a context manager."""

    def __init__(self, model: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = str(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self.base = AutoModelForCausalLM.from_pretrained(self.model_name,
                                                         dtype=torch.float32).eval()
        self.peft: Any = None  # the PeftModel once an adapter is loaded
        self.adapters: dict[str, str] = {}
        self.completion_requests = 0
        self.delay_s = 0.0  # before each completion: a slow or hung server, for tests
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()  # one generation at a time; adapters switch per call
        self._http = ThreadingHTTPServer((host, port), self._handler())
        self._http.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> LoraServer:
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections (keep-alive ones included), as a
        server that goes away does."""
        self._http.shutdown()
        self._http.server_close()
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> LoraServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # -- the API -------------------------------------------------------------------------
    def load_adapter(self, body: dict[str, Any]) -> str:
        from peft import PeftModel

        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise _Refused(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.adapters:
            raise _Refused(400, f"The lora adapter '{name}' has already been loaded.")
        if not (Path(path) / "adapter_config.json").is_file():
            raise _Refused(400, f"Loading lora {name} failed: No adapter found for {path}")
        with self._lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                self.peft.eval()
            else:
                self.peft.load_adapter(path, adapter_name=name)
            self.adapters[name] = path
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, body: dict[str, Any]) -> str:
        name = body.get("lora_name")
        if name not in self.adapters:
            raise _Refused(400, f"The lora adapter '{name}' cannot be found.")
        with self._lock:
            self.peft.delete_adapter(name)
            del self.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if model != self.model_name and model not in self.adapters:
            raise _Refused(404, f"The model `{model}` does not exist.")
        if float(body.get("temperature", 1.0)) != 0.0:
            raise _Refused(400, "this stand-in decodes greedily only: send temperature 0")
        prompt = body.get("prompt")
        prompts: list[Any] = (prompt if isinstance(prompt, list) and prompt
                              and not isinstance(prompt[0], int) else [prompt])
        self.completion_requests += 1
        time.sleep(self.delay_s)
        choices = [self._complete(index, p, model, body) for index, p in enumerate(prompts)]
        return {"id": f"cmpl-{self.completion_requests}", "object": "text_completion",
                "model": model, "choices": choices}

    def _complete(self, index: int, prompt: Any, model: str, body: dict[str, Any]
                  ) -> dict[str, Any]:
        import torch

        ids = (list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
               if isinstance(prompt, str) else [int(i) for i in prompt])
        stops = {int(i) for i in body.get("stop_token_ids") or []}
        stops.add(int(self.tokenizer.eos_token_id))
        with self._lock:
            if model in self.adapters:
                self.peft.set_adapter(model)
                runner, context = self.peft, contextlib.nullcontext()
            else:
                runner = self.peft or self.base
                context = (self.peft.disable_adapter() if self.peft is not None
                           else contextlib.nullcontext())
            with context, torch.inference_mode():
                out = runner.generate(
                    input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                             dtype=torch.long),
                    max_new_tokens=int(body.get("max_tokens", 16)), do_sample=False,
                    eos_token_id=sorted(stops), pad_token_id=self.tokenizer.eos_token_id,
                    output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, len(ids):].tolist()
        logits = torch.stack(out.logits, dim=1)[0].float().log_softmax(-1)
        values = [float(logits[i, t]) for i, t in enumerate(new)]
        stopped = bool(new) and new[-1] in stops
        text = self.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
        choice: dict[str, Any] = {"index": index, "text": text,
                                  "finish_reason": "stop" if stopped else "length",
                                  "logprobs": None}
        if body.get("logprobs") is not None:
            tokens = ([f"token_id:{t}" for t in new] if body.get("return_tokens_as_token_ids")
                      else self.tokenizer.convert_ids_to_tokens(new))
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": values,
                                  "top_logprobs": None, "text_offset": []}
        return choice

    def models(self) -> dict[str, Any]:
        names = [self.model_name, *self.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                server._connections.add(self.connection)

            def finish(self) -> None:
                server._connections.discard(self.connection)
                super().finish()

            def log_message(self, format: str, *args: Any) -> None:  # quiet in tests
                pass

            def _send(self, status: int, payload: Any) -> None:
                raw = (json.dumps(payload) if not isinstance(payload, str) else payload
                       ).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json" if not isinstance(
                    payload, str) else "text/plain")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, server.models())
                else:
                    self._send(404, _error(404, f"no route {self.path}"))

            def do_POST(self) -> None:
                routes = {"/v1/completions": server.completions,
                          "/v1/load_lora_adapter": server.load_adapter,
                          "/v1/unload_lora_adapter": server.unload_adapter}
                route = routes.get(self.path.rstrip("/"))
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                if route is None:
                    self._send(404, _error(404, f"no route {self.path}"))
                    return
                try:
                    self._send(200, route(json.loads(raw or b"{}")))
                except _Refused as exc:
                    self._send(exc.status, _error(exc.status, str(exc)))
                except json.JSONDecodeError as exc:
                    self._send(400, _error(400, f"invalid JSON: {exc}"))

        return Handler


def _error(status: int, message: str) -> dict[str, Any]:
    kind = "NotFoundError" if status == 404 else "BadRequestError"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server = LoraServer(args.model, args.host, args.port)
    print(f"serving {args.model} on {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server._http.serve_forever()


if __name__ == "__main__":
    main()
