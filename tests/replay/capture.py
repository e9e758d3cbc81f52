"""Capture the HTTP requests that real client programs send, as replay fixtures.

Starts the recorder (record.py) on a free port, drives each client against it and writes
one JSON file per captured request into fixtures/, named <client>-<case>-<n>.json.

Run it with a Python that has the clients installed (see README.md):

    /work/capture/venv-clients/bin/python tests/replay/capture.py [--only openai,ollama,...]

Clients: openai (openai-python), ollama (ollama-python), langchain (langchain-openai and
langchain-ollama), llm (the llm CLI). homeassistant.py and openwebui.py reuse the helpers
here for their own clients.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
MODEL = "pichat"
API_KEY = "sk-test"


class Recorder:
    """record.py in a subprocess, with a way to read what arrived since a mark."""

    def __init__(self, workdir: Path | None = None):
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pichat-replay-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "requests.jsonl"
        self.log.touch()
        ready = self.dir / "port"
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "record.py"), "--log", str(self.log),
             "--ready-file", str(ready)],
            stdout=open(self.dir / "recorder.out", "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"recorder did not start: {self.dir / 'recorder.out'}")
            time.sleep(0.05)
        self.port = int(ready.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def entries(self) -> list[dict]:
        with open(self.log, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def mark(self) -> int:
        return len(self.entries())

    def since(self, mark: int, settle: float = 0.4, timeout: float = 10.0) -> list[dict]:
        """Entries after mark, once no new one has come for `settle` seconds."""
        count, stable_since, deadline = -1, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.mark()
            if n != count:
                count, stable_since = n, time.monotonic()
            elif time.monotonic() - stable_since >= settle:
                break
            time.sleep(0.05)
        return self.entries()[mark:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def api_of(path: str) -> str:
    return "openai" if path.startswith("/v1") else "ollama"


def n_tools(body) -> int:
    return len(body.get("tools") or []) if isinstance(body, dict) else 0


DEFAULT_EXPECT = {
    "/v1/models": "list", "/api/tags": "list", "/api/ps": "list",
    "/api/show": "json", "/api/version": "json", "/": "text",
    "/v1/embeddings": "embedding", "/api/embed": "embedding", "/api/embeddings": "embedding",
}


def expect_for(entry: dict, chat_expect: str) -> str:
    if entry["path"] in ("/v1/chat/completions", "/api/chat", "/api/generate",
                         "/v1/completions"):
        return chat_expect
    return DEFAULT_EXPECT.get(entry["path"], chat_expect)


class Fixtures:
    """Writes fixtures; removes a client's old files the first time it writes for it."""

    def __init__(self, out: Path = FIXTURES, clean: bool = True):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.clean = clean
        self.cleaned: set[str] = set()
        self.written: list[Path] = []

    def write(self, slug: str, client: str, case: str, n: int, entry: dict, expect: str,
              expect_tool: str | None = None, **extra) -> Path:
        if self.clean and slug not in self.cleaned:
            for old in self.out.glob(f"{slug}-*.json"):
                old.unlink()
            self.cleaned.add(slug)
        fx = {
            "client": client, "case": case, "api": api_of(entry["path"]),
            "method": entry["method"], "path": entry["path"],
        }
        if entry.get("query"):
            fx["query"] = entry["query"]
        fx.update({
            "headers": entry["headers"], "body": entry["body"],
            "body_bytes": entry["body_bytes"], "n_tools": n_tools(entry["body"]),
            "captured": datetime.date.today().isoformat(), "expect": expect,
        })
        if expect_tool:
            fx["expect_tool"] = expect_tool
        if entry.get("reply"):
            fx["recorder_reply"] = entry["reply"]  # what the stand-in answered
        fx.update(extra)
        path = self.out / f"{slug}-{case}-{n}.json"
        path.write_text(json.dumps(fx, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        self.written.append(path)
        return path


class Session:
    """One client's captures: each case runs a function and saves what it sent."""

    def __init__(self, rec: Recorder, fx: Fixtures, slug: str, client: str):
        self.rec, self.fx, self.slug, self.client = rec, fx, slug, client

    def case(self, case: str, fn: Callable[[], object], expect: str = "text",
             expect_tool: str | None = None, **extra):
        mark = self.rec.mark()
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # the request is what matters; say what the client said
            error = f"{type(e).__name__}: {e}"
            print(f"  ! {self.slug} {case}: {error}", file=sys.stderr)
        entries = self.rec.since(mark)
        if not entries:
            print(f"  ! {self.slug} {case}: no request captured", file=sys.stderr)
        for i, e in enumerate(entries, 1):
            exp = expect_for(e, expect)
            tool = expect_tool if exp == "tool_call" else None
            more = dict(extra)
            if error:
                more["client_error"] = error
            p = self.fx.write(self.slug, self.client, case, i, e, exp, tool, **more)
            print(f"  {p.name}: {e['method']} {e['path']} {e['body_bytes']} B, "
                  f"{n_tools(e['body'])} tools")
        return result


# --- the clients ---------------------------------------------------------------------

WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a given city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city, e.g. Paris"}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the current time in a given timezone",
        "parameters": {"type": "object", "properties": {
            "timezone": {"type": "string", "description": "IANA timezone, e.g. Europe/Paris"}},
            "required": ["timezone"]}}},
]
HELLO = "Hello, who are you? Answer in one sentence."
WEATHER_Q = "What's the weather in Paris?"
WEATHER_RESULT = json.dumps({"city": "Paris", "temperature_c": 18, "conditions": "cloudy"})


def capture_openai(rec: Recorder, fx: Fixtures) -> None:
    from openai import OpenAI
    from pydantic import BaseModel

    s = Session(rec, fx, "openai-python", f"openai-python {version('openai')}")
    c = OpenAI(base_url=rec.url + "/v1", api_key=API_KEY)
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": HELLO}]
    s.case("models", lambda: c.models.list(), "list")
    s.case("chat", lambda: c.chat.completions.create(model=MODEL, messages=msgs))
    s.case("chat-stream", lambda: list(c.chat.completions.create(
        model=MODEL, messages=msgs, stream=True)))
    s.case("chat-stream-usage", lambda: list(c.chat.completions.create(
        model=MODEL, messages=msgs, stream=True, stream_options={"include_usage": True},
        max_tokens=64, temperature=0.2)))
    tmsgs = [{"role": "user", "content": WEATHER_Q}]
    r = s.case("tools", lambda: c.chat.completions.create(
        model=MODEL, messages=tmsgs, tools=WEATHER_TOOLS), "tool_call", "get_weather")
    calls = r.choices[0].message.tool_calls if r else None
    if calls:
        tmsgs2 = tmsgs + [r.choices[0].message,
                          {"role": "tool", "tool_call_id": calls[0].id,
                           "content": WEATHER_RESULT}]
        s.case("tools-result", lambda: c.chat.completions.create(
            model=MODEL, messages=tmsgs2, tools=WEATHER_TOOLS), "text")
    s.case("tools-stream", lambda: list(c.chat.completions.create(
        model=MODEL, messages=tmsgs, tools=WEATHER_TOOLS, stream=True)),
        "tool_call", "get_weather")

    class CityInfo(BaseModel):
        city: str
        country: str
        population: int

    s.case("json-schema", lambda: c.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=CityInfo), "json")
    s.case("json-object", lambda: c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object with a "
                                "key 'answer'."}],
        response_format={"type": "json_object"}), "json")
    s.case("embeddings", lambda: c.embeddings.create(
        model=MODEL, input=["The quick brown fox", "jumps over the lazy dog"]), "embedding")
    s.case("embeddings-float", lambda: c.embeddings.create(
        model=MODEL, input="Hello world", encoding_format="float"), "embedding")


def get_current_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
      city: The name of the city

    Returns:
      str: The current weather
    """
    return "18 C, cloudy"


def capture_ollama(rec: Recorder, fx: Fixtures) -> None:
    from ollama import Client

    s = Session(rec, fx, "ollama-python", f"ollama-python {version('ollama')}")
    c = Client(host=rec.url)
    msgs = [{"role": "user", "content": HELLO}]
    s.case("list", lambda: c.list(), "list")
    s.case("show", lambda: c.show(MODEL), "json")
    s.case("ps", lambda: c.ps(), "list")
    s.case("chat", lambda: c.chat(model=MODEL, messages=msgs))
    s.case("chat-stream", lambda: list(c.chat(model=MODEL, messages=msgs, stream=True)))
    tmsgs = [{"role": "user", "content": WEATHER_Q}]
    r = s.case("tools", lambda: c.chat(model=MODEL, messages=tmsgs,
                                       tools=[get_current_weather]),
               "tool_call", "get_current_weather")
    if r is not None and r.message.tool_calls:
        call = r.message.tool_calls[0]
        tmsgs2 = tmsgs + [r.message, {"role": "tool", "content": "18 C, cloudy",
                                      "tool_name": call.function.name}]
        s.case("tools-result", lambda: c.chat(model=MODEL, messages=tmsgs2,
                                              tools=[get_current_weather]), "text")
    s.case("chat-format-json", lambda: c.chat(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        format={"type": "object", "properties": {"city": {"type": "string"},
                                                 "population": {"type": "integer"}},
                "required": ["city", "population"]}), "json")
    s.case("generate", lambda: c.generate(model=MODEL, prompt="Why is the sky blue?"))
    s.case("generate-stream", lambda: list(c.generate(
        model=MODEL, prompt="Why is the sky blue?", stream=True)))
    s.case("embed", lambda: c.embed(
        model=MODEL, input=["The quick brown fox", "jumps over the lazy dog"]), "embedding")
    s.case("embeddings", lambda: c.embeddings(model=MODEL, prompt="Hello world"),
           "embedding")


def capture_langchain(rec: Recorder, fx: Fixtures) -> None:
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a given city."""
        return "18 C, cloudy"

    s = Session(rec, fx, "langchain-openai", f"langchain-openai {version('langchain-openai')}"
                f" (langchain-core {version('langchain-core')})")
    llm = ChatOpenAI(model=MODEL, base_url=rec.url + "/v1", api_key=API_KEY)
    s.case("invoke", lambda: llm.invoke(HELLO))
    s.case("stream", lambda: list(llm.stream(HELLO)))
    s.case("tools", lambda: llm.bind_tools([get_weather]).invoke(WEATHER_Q),
           "tool_call", "get_weather")

    s = Session(rec, fx, "langchain-ollama", f"langchain-ollama {version('langchain-ollama')}"
                f" (langchain-core {version('langchain-core')})")
    chat = ChatOllama(model=MODEL, base_url=rec.url)
    s.case("invoke", lambda: chat.invoke(HELLO))
    s.case("stream", lambda: list(chat.stream(HELLO)))
    s.case("tools", lambda: chat.bind_tools([get_weather]).invoke(WEATHER_Q),
           "tool_call", "get_weather")


def capture_llm(rec: Recorder, fx: Fixtures) -> None:
    s = Session(rec, fx, "llm-cli", f"llm {version('llm')}")
    home = Path(tempfile.mkdtemp(prefix="llm-user-"))
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: {MODEL}\n  model_name: {MODEL}\n  api_base: \"{rec.url}/v1\"\n")
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    exe = str(Path(sys.executable).parent / "llm")

    def run(*args):
        p = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=60)
        if p.returncode:
            raise RuntimeError(p.stderr.strip()[-300:])
        return p.stdout

    s.case("prompt", lambda: run("-m", MODEL, "Hello"))
    s.case("continue", lambda: run("-c", "and again"))
    s.case("prompt-system-no-stream", lambda: run(
        "-m", MODEL, "--no-stream", "-s", "Answer in French.", "Hello"))


CLIENTS = {"openai": capture_openai, "ollama": capture_ollama,
           "langchain": capture_langchain, "llm": capture_llm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(CLIENTS),
                    help="comma-separated: " + ",".join(CLIENTS))
    ap.add_argument("--workdir", type=Path, help="where the recorder's log goes")
    a = ap.parse_args(argv)
    fx = Fixtures()
    with Recorder(a.workdir) as rec:
        print(f"recorder at {rec.url}, log {rec.log}")
        for name in a.only.split(","):
            print(f"== {name}")
            CLIENTS[name](rec, fx)
    print(f"{len(fx.written)} fixtures written to {fx.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
