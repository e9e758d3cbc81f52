"""The real clients against a real pichat cluster: `make clients-e2e` (scripts/clients-e2e.sh
makes the virtual environments and runs this in Open WebUI's).

1. `pichat up --workers 2` (`make run`'s cluster: the default model), its own keys and
   ports; the router's log says, per request, how much of the prompt was cached.
2. Open WebUI (its default settings, offline, no login) in headless Chromium, once through
   pichat's OpenAI API and once through its Ollama API, with the API key:
   - ten messages in one chat, each answered (Open WebUI's built-in tools go with every
     one), the follow-ups warm (their prompt read from the KV cache the turn before left);
   - a new chat with a text file attached: the file embedded by pichat, its text sent with
     the question (Open WebUI's record of the sources), the question answered from it
     (asked again in a new chat, at most three times, when the sampled answer misses).
   Screenshots of the first and tenth answers and of the document's go to the output.
3. The Python clients (tests/clients/libraries.py, in their own environment): LangChain's
   ChatOpenAI and ChatOllama with a tool, the `ollama` client's chat / embed / list, the
   `openai` client.

Nothing is asserted on time; the figures (seconds per turn, cached tokens) are printed and
saved in <out>/summary.json. Exit status 0 only if every check held.

    python tests/clients/e2e.py --pichat .venv/bin/pichat --clients-python P --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "replay"))
from openwebui import CHROMIUM, CHROMIUM_ARGS, Driver, OpenWebUI  # noqa: E402

MESSAGES = [
    "Hello, how are you? Answer in one sentence.",
    "And what is 2+2?",
    "What colour is the sky on a clear day?",
    "What is the capital of France?",
    "Say the word banana, nothing else.",
    "How many legs does a cat have?",
    "What day comes after Monday?",
    "Give me one synonym for happy.",
    "Is ice colder than steam? One sentence.",
    "Thank you! Say goodbye in one sentence.",
]
DOC_TEXT = ("Pichat release notes\n\nPichat 0.9 was released on 3 November 2026. It serves "
            "an OpenAI-compatible API and an Ollama-compatible API from a ZeroMQ router and "
            "llama.cpp workers. The mascot of Pichat is a small grey owl called Pip.\n")
DOC_TRIES = 3
DOC_QUESTION = "According to the attached file, what is the name of Pichat's mascot?"
DONE = re.compile(r"req=(\w+) session=\S+ worker=\S+ done: (\w+), prompt (\d+) \(cached (\d+)\)")
READY = re.compile(r"web chat at (http://[\d.:]+)/#key=([\w-]+)")


class Failed(Exception):
    pass


class Cluster:
    """`pichat up`, as `make run` starts it, on ports of its own."""

    def __init__(self, pichat: str, workdir: Path) -> None:
        keys = workdir / "keys"
        subprocess.run([pichat, "keygen", "--keys", str(keys)], check=True,
                       stdout=subprocess.DEVNULL)
        self.log_path = workdir / "pichat.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [pichat, "up", "--workers", "2", "--http", "127.0.0.1:0", "--clients-bind",
             "tcp://127.0.0.1:0", "--workers-bind", "tcp://127.0.0.1:0", "--keys", str(keys),
             "--log-level", "info"], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.url = self.key = ""

    def wait(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(f"pichat up exited {self.proc.returncode}: see {self.log_path}")
            if found := READY.search(self.log_path.read_text()):
                self.url, self.key = found.group(1), found.group(2)
                return
            time.sleep(1)
        raise Failed("pichat up did not become ready")

    def done_lines(self) -> list[tuple[str, str, int, int]]:
        """(request, finish, prompt tokens, cached tokens) of every request answered."""
        return [(m[1], m[2], int(m[3]), int(m[4]))
                for m in DONE.finditer(self.log_path.read_text())]

    def metric(self, name: str) -> float:
        req = urllib.request.Request(self.url + "/metrics",
                                     headers={"Authorization": f"Bearer {self.key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        found = re.search(rf"^{re.escape(name)} ([\d.e+]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log.close()


def text_of(message: dict) -> str:
    """An assistant message's text: its `content`, or, as Open WebUI saves an answer it
    streamed, the text items of its `output`."""
    if isinstance(message.get("content"), str) and message["content"].strip():
        return message["content"]
    parts = []
    for item in message.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            parts += [c.get("text", "") for c in item.get("content") or []
                      if isinstance(c, dict) and isinstance(c.get("text"), str)]
    return "".join(parts)


def plain(text: str) -> str:
    """`text` with straight quotes: Open WebUI's input box makes typed ones typographic."""
    return text.translate(str.maketrans("\u2018\u2019\u201c\u201d", "''\"\""))


class Page(Driver):
    """Open WebUI's page as a user uses it (tests/replay/openwebui.py's driver); what it
    shows read back from Open WebUI's own API (the chat as it stored it), not guessed from
    the page's markup."""

    def chat(self) -> dict:
        """The current chat as Open WebUI stored it ({} before its first message). Its id
        is read from the page's own location: Open WebUI moves to /c/<id> with
        history.replaceState, which the browser's URL (page.url) does not follow."""
        return self.page.evaluate(
            """async () => {
                const found = location.pathname.match(/\\/c\\/([\\w-]+)/);
                if (!found) return {};
                const r = await fetch('/api/v1/chats/' + found[1],
                    {headers: {Authorization: 'Bearer ' + localStorage.token}});
                return r.ok ? await r.json() : {};
            }""")

    def answer(self, asked: str) -> dict | None:
        """The assistant's message answering the user's `asked`, once it is done."""
        history = (self.chat().get("chat") or {}).get("history") or {}
        messages = history.get("messages") or {}
        for m in messages.values():
            if m.get("role") == "user" and plain(m.get("content") or "") == plain(asked):
                for child in m.get("childrenIds") or []:
                    reply = messages.get(child) or {}
                    if reply.get("done") or reply.get("error"):
                        return reply
        return None

    def send(self, text: str, timeout: float = 900) -> tuple[dict, float]:
        """(the answer to `text`, seconds until it was done)."""
        box = self.page.locator("#chat-input")
        box.wait_for(timeout=60_000)
        box.click()
        self.page.keyboard.type(text)
        t0 = time.monotonic()
        self.page.keyboard.press("Enter")
        while time.monotonic() - t0 < timeout:
            if (reply := self.answer(text)) is not None:
                return reply, time.monotonic() - t0
            time.sleep(1)
        raise Failed(f"no answer to {text!r} in {timeout:.0f} s")


def run_open_webui(api: str, exe: str, cluster: Cluster, out: Path, checks: list) -> dict:
    from playwright.sync_api import sync_playwright

    def check(what: str, ok: bool, detail: str = "") -> None:
        checks.append({"check": f"open-webui {api}: {what}", "ok": bool(ok), "detail": detail})
        print(f"  [{'ok' if ok else 'FAILED'}] {what}{': ' + detail if detail else ''}",
              flush=True)

    rundir = out / f"open-webui-{api}"
    rundir.mkdir(parents=True, exist_ok=True)
    owui = OpenWebUI(exe, rundir, cluster.url + "/v1" if api == "openai" else None,
                     cluster.url if api == "ollama" else None, key=cluster.key)
    result: dict = {"turns": []}
    try:
        owui.wait()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            ui = Page(page, owui.url)
            ui.open()
            for i, text in enumerate(MESSAGES, 1):
                before = {line[0] for line in cluster.done_lines()}
                reply, seconds = ui.send(text)
                new = [line for line in cluster.done_lines() if line[0] not in before]
                chat = max(new, key=lambda line: line[2], default=None)  # (tools: largest)
                turn = {"turn": i, "asked": text, "seconds": round(seconds, 1),
                        "answer": text_of(reply)[:300],
                        "error": reply.get("error"),
                        "prompt_tokens": chat[2] if chat else None,
                        "cached_tokens": chat[3] if chat else None}
                result["turns"].append(turn)
                print(f"  turn {i}: {seconds:.1f} s, prompt {turn['prompt_tokens']} "
                      f"(cached {turn['cached_tokens']}): {turn['answer'][:80]!r}", flush=True)
                if i in (1, len(MESSAGES)):
                    page.screenshot(path=str(out / f"open-webui-{api}-turn{i}.png"),
                                    full_page=True)
                    check(f"message {i} answered", turn["answer"].strip() and not
                          turn["error"], repr(turn["answer"][:120] or turn["error"]))
            later = [t for t in result["turns"][1:] if t["prompt_tokens"]]
            warm = [t for t in later if t["cached_tokens"] >= 0.8 * t["prompt_tokens"]]
            check("every message answered", all(t["answer"].strip() and not t["error"]
                                                for t in result["turns"]))
            check("follow-ups warm", later and len(warm) == len(later),
                  f"{len(warm)} of {len(later)} later turns read >= 80 % of their prompt "
                  "from the KV cache")

            doc = rundir / "pichat-notes.txt"
            doc.write_text(DOC_TEXT)
            # Open WebUI sends no seed: the model samples, and now and then it answers
            # "I will search the attached files" instead. A user would ask again; so does
            # this check (a new chat each time, at most DOC_TRIES), and says how often.
            for tries in range(1, DOC_TRIES + 1):
                ui.new_chat()
                embedded = cluster.metric('pichat_events_total{event="embeddings_requests"}')
                ui.attach(doc)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and cluster.metric(
                        'pichat_events_total{event="embeddings_requests"}') <= embedded:
                    time.sleep(1)
                if tries == 1:
                    check("the document embedded by pichat", cluster.metric(
                        'pichat_events_total{event="embeddings_requests"}') > embedded)
                page.get_by_text(doc.name).first.wait_for(timeout=60_000)
                reply, seconds = ui.send(DOC_QUESTION)
                answer = text_of(reply)
                print(f"  document, try {tries}: {seconds:.1f} s: {answer[:80]!r}", flush=True)
                if "pip" in answer.lower():
                    break
            retrieved = json.dumps(reply.get("sources") or [])
            result["document"] = {"seconds": round(seconds, 1), "answer": answer[:300],
                                  "tries": tries, "error": reply.get("error")}
            page.screenshot(path=str(out / f"open-webui-{api}-document.png"), full_page=True)
            check("the document's text sent with the question", "owl called Pip" in retrieved,
                  f"{len(reply.get('sources') or [])} source(s) in Open WebUI's record")
            check("the document's question answered from it", "pip" in answer.lower(),
                  f"try {tries} of {DOC_TRIES}: " + repr(answer[:160] or reply.get("error")))
            browser.close()
    finally:
        owui.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pichat", required=True)
    ap.add_argument("--clients-python", required=True)
    ap.add_argument("--open-webui", default=str(Path(sys.executable).parent / "open-webui"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--apis", default="openai,ollama")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    checks: list[dict] = []
    summary: dict = {"checks": checks}
    cluster = Cluster(a.pichat, a.out)
    try:
        t0 = time.monotonic()
        cluster.wait()
        print(f"pichat up: ready in {time.monotonic() - t0:.0f} s at {cluster.url}", flush=True)
        lib = subprocess.run([a.clients_python, str(HERE / "libraries.py"), cluster.url,
                              cluster.key], capture_output=True, text=True, timeout=1800)
        sys.stderr.write(lib.stderr[-4000:])
        for line in lib.stdout.splitlines():
            item = json.loads(line)
            checks.append(item)
            print(f"  [{'ok' if item['ok'] else 'FAILED'}] {item['check']}: {item['detail']}",
                  flush=True)
        if lib.returncode != 0 and not any(not c["ok"] for c in checks):
            checks.append({"check": "libraries.py", "ok": False,
                           "detail": f"exited {lib.returncode}"})
        for api in a.apis.split(","):
            print(f"Open WebUI through pichat's {api} API", flush=True)
            try:
                summary[f"open-webui-{api}"] = run_open_webui(api, a.open_webui, cluster,
                                                              a.out, checks)
            except Exception as exc:
                checks.append({"check": f"open-webui {api}", "ok": False,
                               "detail": f"{type(exc).__name__}: {exc}"})
                print(f"  [FAILED] {type(exc).__name__}: {exc}", flush=True)
    finally:
        cluster.stop()
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    failed = [c for c in checks if not c["ok"]]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks held; screenshots and "
          f"summary.json in {a.out}")
    return 1 if failed or not checks else 0


if __name__ == "__main__":
    sys.exit(main())
