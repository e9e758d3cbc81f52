"""Capture what Open WebUI sends to its model server, driving its web page as a user would.

Starts the recorder, then Open WebUI (offline, no auth, a fresh DATA_DIR) pointed at it,
once through its OpenAI connection and once through its Ollama connection, and drives the
page with Playwright and Debian's Chromium:

  1. open the page (a first visit: the "What's New" dialog), the only model is selected;
  2. send "Hello, how are you? Answer in one sentence.", wait for the answer and the
     background tasks (title, tags, follow-ups); send "And what is 2+2?";
  3. a new chat with Chat Controls > Advanced Params > Function Calling set to "Legacy"
     (no built-in tools), the same two messages;
  4. a new chat (default settings) with a small .txt file attached, and a question on it.

Every request the recorder got is saved as fixtures/open-webui-<run>-<step>-<kind>-<n>.json
(kind: chat, title, tags, follow-ups, queries, models, embed, ...). A summary goes to
<workdir>/summary.json and a screenshot of the first chat to /work/capture/owui.png.

    /work/capture/venv-owui/bin/python tests/replay/openwebui.py \
        --python /work/capture/venv-clients/bin/python [--runs openai,ollama]

The recorder runs under --python (any Python with aiohttp); Playwright comes from the
Open WebUI venv that runs this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from capture import Fixtures, Recorder  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY = "sk-test"
HELLO = "Hello, how are you? Answer in one sentence."
SECOND = "And what is 2+2?"
DOC_TEXT = ("Pichat release notes\n\nPichat 0.9 was released on 3 November 2026. It serves "
            "an OpenAI-compatible API and an Ollama-compatible API from a ZeroMQ router and "
            "llama.cpp workers. The default port is 11434. The mascot is a small grey owl "
            "called Pip.\n")
DOC_QUESTION = "According to the attached file, what is the mascot of Pichat called?"
CANNED = "I am doing well"  # part of the recorder's canned answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def owui_env(data_dir: Path, openai_url: str | None, ollama_url: str | None,
             key: str = KEY) -> dict:
    """Open WebUI offline, no login, one connection, embeddings through that connection."""
    env = {**os.environ,
           "DATA_DIR": str(data_dir), "WEBUI_AUTH": "False", "OFFLINE_MODE": "true",
           "HF_HUB_OFFLINE": "1", "ENABLE_VERSION_UPDATE_CHECK": "false",
           "ANONYMIZED_TELEMETRY": "false", "DO_NOT_TRACK": "true",
           "SCARF_NO_ANALYTICS": "true", "USER_AGENT": "open-webui-capture",
           "ENABLE_OPENAI_API": "true" if openai_url else "false",
           "ENABLE_OLLAMA_API": "true" if ollama_url else "false"}
    if openai_url:
        env.update({"OPENAI_API_BASE_URL": openai_url, "OPENAI_API_KEY": key,
                    "RAG_EMBEDDING_ENGINE": "openai", "RAG_EMBEDDING_MODEL": "pichat",
                    "RAG_OPENAI_API_BASE_URL": openai_url, "RAG_OPENAI_API_KEY": key})
    if ollama_url:
        env.update({"OLLAMA_BASE_URL": ollama_url,
                    "OLLAMA_API_CONFIGS": json.dumps({"0": {"key": key}}),
                    "RAG_EMBEDDING_ENGINE": "ollama", "RAG_EMBEDDING_MODEL": "pichat:latest",
                    "RAG_OLLAMA_BASE_URL": ollama_url, "RAG_OLLAMA_API_KEY": key})
    return env


class OpenWebUI:
    def __init__(self, exe: str, workdir: Path, openai_url: str | None,
                 ollama_url: str | None, key: str = KEY):
        # A fresh DATA_DIR: Open WebUI keeps its settings in its database (persistent
        # config), so a reused one would still point at an older recorder's port.
        self.data = workdir / "data"
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "open-webui.log", "w")
        self.proc = subprocess.Popen(
            [exe, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=owui_env(self.data, openai_url, ollama_url, key), stdout=self.log,
            stderr=subprocess.STDOUT, cwd=workdir)

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"open-webui exited {self.proc.returncode}; see its log")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError("open-webui did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def kind_of(entry: dict) -> tuple[str, str]:
    """(kind, expect) of one captured request."""
    path, body = entry["path"], entry["body"]
    simple = {"/v1/models": ("models", "list"), "/api/tags": ("tags-list", "list"),
              "/api/ps": ("ps", "list"), "/api/version": ("version", "json"),
              "/api/show": ("show", "json"), "/v1/embeddings": ("embed", "embedding"),
              "/api/embed": ("embed", "embedding"), "/api/embeddings": ("embed", "embedding")}
    if path in simple:
        return simple[path]
    if path not in ("/v1/chat/completions", "/api/chat", "/api/generate"):
        return path.strip("/").replace("/", "_") or "root", "text"
    msgs = body.get("messages") or [] if isinstance(body, dict) else []
    last = msgs[-1].get("content") if msgs else (body or {}).get("prompt", "")
    last = last if isinstance(last, str) else json.dumps(last)
    if "### Task:" in last:
        for key, kind in (("follow_ups", "follow-ups"), ("tags", "tags"),
                          ("queries", "queries"), ("title", "title"), ("text", "autocomplete")):
            if f'"{key}"' in last:
                return kind, "json"
    return "chat", "text"


class Driver:
    """The page, as a user uses it."""

    def __init__(self, page, base: str):
        self.page, self.base = page, base

    def open(self) -> None:
        pg = self.page
        pg.goto(self.base + "/", wait_until="domcontentloaded", timeout=120_000)
        try:
            pg.get_by_text("Okay, Let's Go!").click(timeout=20_000)
        except Exception:
            pass  # no "What's New" dialog this time
        pg.locator("#chat-input").wait_for(timeout=60_000)

    def new_chat(self) -> None:
        self.page.goto(self.base + "/", wait_until="domcontentloaded", timeout=60_000)
        self.page.locator("#chat-input").wait_for(timeout=60_000)
        time.sleep(1)

    def answers(self) -> int:
        return self.page.get_by_text(CANNED).count()

    def send(self, text: str, timeout: float = 120) -> None:
        before = self.answers()
        box = self.page.locator("#chat-input")
        box.click()
        self.page.keyboard.type(text)
        self.page.keyboard.press("Enter")
        deadline = time.monotonic() + timeout
        while self.answers() <= before and time.monotonic() < deadline:
            time.sleep(0.5)

    def function_calling(self, want: str) -> str:
        """Chat Controls > Advanced Params > Function Calling: click until it says want."""
        pg = self.page
        pg.locator("button[aria-label='Controls']").first.click()
        btn = pg.locator("xpath=//*[normalize-space(text())='Function Calling']"
                         "/following::button[1]")
        btn.wait_for(timeout=20_000)
        for _ in range(4):
            if btn.inner_text().strip() == want:
                break
            btn.click()
            time.sleep(0.3)
        got = btn.inner_text().strip()
        pg.locator("button[aria-label='Controls']").first.click()  # close the panel
        time.sleep(0.5)
        return got

    def attach(self, path: Path) -> None:
        self.page.locator("input[type=file]:not(#camera-input)").first.set_input_files(
            str(path))


def run_one(name: str, rec: Recorder, fx: Fixtures, exe: str, workdir: Path,
            summary: dict, screenshot: Path | None) -> None:
    from playwright.sync_api import sync_playwright

    client = f"open-webui {version('open-webui')}"
    openai_url = rec.url + "/v1" if name == "openai" else None
    ollama_url = rec.url if name == "ollama" else None
    steps: list[tuple[str, list[dict]]] = []

    def step(label: str, fn, settle: float = 3.0):
        mark = rec.mark()
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:
            print(f"  ! {name} {label}: {type(e).__name__}: {e}", file=sys.stderr)
            summary.setdefault("errors", []).append(f"{name} {label}: {e}")
        got = rec.since(mark, settle=settle, timeout=120)
        steps.append((label, got))
        print(f"  {name} {label}: {len(got)} requests in {time.monotonic() - t0:.1f}s")

    rundir = workdir / name
    rundir.mkdir(parents=True, exist_ok=True)
    doc = rundir / "pichat-notes.txt"
    doc.write_text(DOC_TEXT)
    owui = OpenWebUI(exe, rundir, openai_url, ollama_url)
    try:
        step("startup", lambda: owui.wait(), settle=5.0)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            d = Driver(page, owui.url)
            step("pageload", d.open, settle=4.0)
            step("hello", lambda: d.send(HELLO), settle=4.0)
            step("second", lambda: d.send(SECOND), settle=4.0)
            if screenshot:
                page.screenshot(path=str(screenshot))
            page.screenshot(path=str(rundir / "native.png"))
            d.new_chat()
            got = d.function_calling("Legacy")
            summary.setdefault("function_calling_set", {})[name] = got
            step("legacy-hello", lambda: d.send(HELLO), settle=4.0)
            step("legacy-second", lambda: d.send(SECOND), settle=4.0)
            page.screenshot(path=str(rundir / "legacy.png"))
            d.new_chat()
            step("upload", lambda: (d.attach(doc), time.sleep(5)), settle=4.0)
            step("doc-question", lambda: d.send(DOC_QUESTION), settle=4.0)
            page.screenshot(path=str(rundir / "document.png"))
            browser.close()
    finally:
        owui.stop()

    if not any(kind_of(e)[0] == "chat" for _, entries in steps for e in entries):
        raise RuntimeError(f"{name}: no chat request captured; old fixtures kept")
    for old in fx.out.glob(f"open-webui-{name}-*.json"):
        old.unlink()
    counts: dict[str, int] = {}
    for label, entries in steps:
        for e in entries:
            kind, expect = kind_of(e)
            case = f"{name}-{label}-{kind}"
            counts[case] = counts.get(case, 0) + 1
            p = fx.write("open-webui", client, case, counts[case], e, expect,
                         connection=name, step=label)
            body = e["body"] if isinstance(e["body"], dict) else {}
            tools = [t.get("function", {}).get("name") for t in body.get("tools") or []]
            summary.setdefault("fixtures", []).append({
                "file": p.name, "method": e["method"], "path": e["path"],
                "bytes": e["body_bytes"], "n_tools": len(tools), "tools": tools,
                "keys": sorted(body), "kind": kind, "step": label})
            print(f"    {p.name}: {e['method']} {e['path']} {e['body_bytes']} B, "
                  f"{len(tools)} tools")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="openai,ollama")
    ap.add_argument("--open-webui", default=str(Path(sys.executable).parent / "open-webui"))
    ap.add_argument("--python", default=sys.executable, help="runs the recorder")
    ap.add_argument("--workdir", type=Path, default=Path("/work/capture/owui-runs"))
    ap.add_argument("--screenshot", type=Path, default=Path("/work/capture/owui.png"))
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    fx = Fixtures(clean=False)
    summary: dict = {"open_webui": version("open-webui")}
    old_exe = sys.executable
    sys.executable = a.python  # Recorder starts record.py with sys.executable
    try:
        with Recorder(a.workdir / "recorder") as rec:
            sys.executable = old_exe
            print(f"recorder at {rec.url}")
            for i, name in enumerate(a.runs.split(",")):
                run_one(name, rec, fx, a.open_webui, a.workdir, summary,
                        a.screenshot if i == 0 else None)
    finally:
        sys.executable = old_exe
    (a.workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(fx.written)} fixtures; summary in {a.workdir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
