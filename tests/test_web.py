"""The web chat page in a real headless browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import aiohttp
import pytest

from conftest import Cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium here (make test installs Debian's chromium as root)")


@pytest.fixture
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        await b.close()


async def test_chat_in_the_browser_streams_and_keeps_the_conversation(cluster: Cluster, browser):
    cluster.router()
    cluster.worker("w1", "--sim-reply-tokens", "12", "--sim-gen-tps", "60")
    cluster.worker("w2", "--sim-reply-tokens", "12", "--sim-gen-tps", "60")
    status = await cluster.wait_workers(2)
    page = await browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    await page.goto(status["router"]["http"] + "/")
    assert await page.title() == "pichat"

    await page.fill("#input", "Hello from the browser")
    await page.keyboard.press("Enter")
    first = page.locator(".msg.assistant").nth(0)
    await first.wait_for()
    # Streaming: the answer grows before it is done.
    await page.wait_for_function(
        "() => { const m = document.querySelector('.msg.assistant');"
        " return m && m.textContent.length > 0 && !m.dataset.done; }", timeout=10_000)
    await page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20_000)
    assert len((await first.text_content()).split()) == 12
    stats = page.locator(".stats").nth(0)
    first_stats = await stats.text_content()
    assert re.match(r"w[12] · TTFT \d+ ms · [\d.]+ tok/s · 12 tokens", first_stats), first_stats

    await page.fill("#input", "And a second question")
    await page.click("#send")
    await page.wait_for_function(
        "() => document.querySelectorAll('.msg.assistant')[1]?.dataset.done === '1'",
        timeout=20_000)
    second_stats = await page.locator(".stats").nth(1).text_content()
    # Same conversation: same worker, and most of the prompt came from its cache.
    assert second_stats.split(" · ")[0] == first_stats.split(" · ")[0]
    cached, total = map(int, re.search(r"(\d+)/(\d+) prompt tokens cached", second_stats).groups())
    assert cached > 0 and cached > total / 2
    assert await page.locator(".msg.user").count() == 2

    await page.click("#toggle-cluster")
    await page.wait_for_selector("#cluster table")
    assert "w1" in await page.text_content("#cluster") and "w2" in await page.text_content(
        "#cluster")

    await page.click("#new-chat")
    assert await page.locator(".msg").count() == 0
    # The page fits a phone screen: nothing wider than the viewport.
    width = await page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390


async def test_the_page_reports_errors(cluster: Cluster, browser):
    cluster.router("--startup-grace", "0")  # no workers: the API answers 503
    async with cluster.client() as zmq_client:
        status = await zmq_client.status()
    page = await browser.new_page()
    await page.goto(status["router"]["http"] + "/")
    await page.fill("#input", "anyone there?")
    await page.keyboard.press("Enter")
    await page.wait_for_selector(".msg.assistant.error", timeout=30_000)
    assert "no worker" in await page.text_content(".msg.assistant.error")


async def test_the_page_takes_its_api_key_from_the_link_and_drops_it_from_the_address(
        cluster: Cluster, browser):
    cluster.router("--api-key", "sesame")
    cluster.worker("w1", "--sim-reply-tokens", "4")
    await cluster.wait_workers(1)
    page = await browser.new_page()
    await page.goto(cluster.http_url + "/#key=sesame")  # the link `pichat up` prints
    assert "sesame" not in await page.evaluate("() => location.href")
    assert await page.evaluate("() => localStorage.getItem('pichat-key')") == "sesame"
    await page.fill("#input", "hello")
    await page.keyboard.press("Enter")  # answered without asking for a key
    await page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20_000)


async def answered(page, n: int) -> None:
    await page.wait_for_function(
        f"() => document.querySelectorAll('.msg.assistant')[{n - 1}]?.dataset.done === '1'",
        timeout=20_000)


async def test_conversations_are_listed_reopened_after_a_reload_continued_renamed_deleted(
        cluster: Cluster, browser, tmp_path):
    cluster.router("--db", str(tmp_path / "c.db"))
    cluster.worker("w1", "--sim-reply-tokens", "6")
    await cluster.wait_workers(1)
    page = await browser.new_page(viewport={"width": 1100, "height": 800})
    await page.goto(cluster.http_url + "/")
    await page.fill("#input", "Plan a picnic")
    await page.keyboard.press("Enter")
    await answered(page, 1)
    first_answer = await page.locator(".msg.assistant").nth(0).text_content()
    item = page.locator("#conversations li[data-id]")
    await item.first.wait_for()
    assert await item.count() == 1
    # Titled by its first message at once, then by the model (off the hot path) a moment
    # later: the page shows the model's title when it lists again.
    async with cluster.client() as c:
        for _ in range(200):
            (listed,) = await c.conversations("list")
            if listed["title"] != "Plan a picnic":
                break
            await asyncio.sleep(0.1)
    picnic, title = listed["id"], listed["title"]
    assert title and title != "Plan a picnic"
    entry = page.locator(f"#conversations li[data-id='{picnic}']")
    await page.wait_for_function(
        f"() => document.querySelector(\"#conversations li[data-id='{picnic}'] button.open\")"
        f"?.textContent === {json.dumps(title)}", timeout=20_000)

    await page.reload()  # the open conversation comes back, and goes on
    await page.wait_for_selector(".msg.assistant[data-done='1']")
    assert await page.locator(".msg.user").all_text_contents() == ["Plan a picnic"]
    assert await page.locator(".msg.assistant").nth(0).text_content() == first_answer
    await page.fill("#input", "Where?")
    await page.keyboard.press("Enter")
    await answered(page, 2)
    stats = await page.locator(".stats").last.text_content()
    assert re.search(r"[1-9]\d*/\d+ prompt tokens cached", stats), stats  # its history, warm
    async with cluster.client() as c:
        (listed,) = await c.conversations("list")
    assert listed["messages"] == 4

    await page.click("#new-chat")  # another one, then back to the first from the list
    await page.fill("#input", "Something else")
    await page.keyboard.press("Enter")
    await answered(page, 1)
    await page.wait_for_function(
        "() => document.querySelectorAll('#conversations li[data-id]').length === 2")
    await entry.locator("button.open").click()
    await page.wait_for_function("() => document.querySelectorAll('.msg.user').length === 2")
    assert await page.locator(".msg.user").all_text_contents() == ["Plan a picnic", "Where?"]

    page.once("dialog", lambda d: d.accept("Picnic 2027"))
    await entry.locator("button.rename").click()
    await page.wait_for_selector("#conversations li:has-text('Picnic 2027')")
    page.once("dialog", lambda d: d.accept())
    await entry.locator("button.delete").click()
    await page.wait_for_function(
        "() => document.querySelectorAll('#conversations li[data-id]').length === 1")
    assert await page.locator(".msg").count() == 0  # the open one was deleted: a new chat
    async with cluster.client() as c:
        assert [x["id"] for x in await c.conversations("list")] != [picnic]
        assert len(await c.conversations("list")) == 1


async def test_without_a_store_the_page_chats_statelessly_with_no_list(cluster: Cluster,
                                                                        browser):
    cluster.router("--db", "off")
    cluster.worker("w1", "--sim-reply-tokens", "6")
    await cluster.wait_workers(1)
    page = await browser.new_page(viewport={"width": 1100, "height": 800})
    await page.goto(cluster.http_url + "/")
    for n, text in enumerate(["First", "Second"], 1):
        await page.fill("#input", text)
        await page.keyboard.press("Enter")
        await answered(page, n)
    assert not await page.locator("#sidebar").is_visible()
    stats = await page.locator(".stats").last.text_content()
    assert re.search(r"[1-9]\d*/\d+ prompt tokens cached", stats), stats


async def test_json_answers_are_asked_for_and_shown_indented(cluster: Cluster, browser):
    cluster.router()
    cluster.worker("w1", "--sim-reply-tokens", "4")
    await cluster.wait_workers(1)
    page = await browser.new_page(viewport={"width": 1100, "height": 800})
    await page.goto(cluster.http_url + "/")
    await page.check("#json")  # response_format json_object: the worker's grammar
    await page.fill("#input", "Describe a cat")
    await page.keyboard.press("Enter")
    await answered(page, 1)
    shown = await page.locator(".msg.assistant pre.json").text_content()
    assert "\n" in shown and len(json.loads(shown)["answer"].split()) == 4  # indented JSON
    await page.uncheck("#json")
    await page.fill("#input", "And a dog?")
    await page.keyboard.press("Enter")
    await answered(page, 2)
    assert await page.locator(".msg.assistant").nth(1).locator("pre").count() == 0
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{cluster.http_url}/metrics") as r:
            assert 'pichat_events_total{event="structured_requests"} 1.0' in await r.text()
