"""The dashboard (``GET /``) in a real headless Chromium, following a live call.

A real gateway on a loopback port with API tokens configured (so the page's token handling is
exercised: Bearer on fetch, ``access_token`` on EventSource), a scripted two-voice engine, and a
simulated Twilio call streamed at about real time. The page must list the call (firehose), show
partials while words arrive, and show the finals in audio order with the right speakers, mid-call
and at the end. Selenium's blocking calls run in a thread (``asyncio.to_thread``): the event loop
serves the gateway meanwhile.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install-system-deps.sh``) and
``selenium`` (the dev extras). Missing ones fail the test, they do not skip it.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from gateway.api.routes import HUB
from gateway.stt.scripted import Script, ScriptedSession, parse_script
from gateway.stt.session import SessionParams
from tests.gateway_server import (
    Gateway,
    call_messages,
    hello_engine,
    poll_until,
    running_gateway,
    send_messages,
    settings_for,
)
from tests.siprec_peer import (
    AORS,
    NAMES,
    SipUdpClient,
    answer_ports,
    establish,
    play_rtp,
    rs_metadata,
    siprec_gateway,
    siprec_settings,
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
SETUP = "scripts/install-system-deps.sh"
API_TOKEN = "dashboard-test-token-0123456789"
CALL_SID = "CA0000000000000000000000000000DA5H"
CALL_S = 7.8

# Channel 0 = Twilio's inbound track (the customer, Dana); channel 1 = outbound (the agent, Alex).
# Dana's "okay" (3.1-3.4 s) is final long before Alex's turn that started earlier (2.6-4.2 s):
# the page must still put it after Alex's turn (audio order, not arrival order).
AGENT = [
    [["thank", 200, 450], ["you", 500, 700], ["for", 750, 900], ["calling", 950, 1300]],
    [["let", 2600, 2800], ["me", 2850, 3000], ["check", 3050, 3400], ["that", 3450, 3700]]
    + [["for", 3750, 3900], ["you", 3950, 4200]],
    [["all", 5800, 6000], ["fixed", 6050, 6400], ["goodbye", 6500, 7000]],
]
CUSTOMER = [
    [["hi", 1500, 1700], ["my", 1750, 1850], ["card", 1900, 2150], ["declined", 2200, 2500]],
    [["okay", 3100, 3400]],
    [["thanks", 4800, 5000], ["so", 5050, 5200], ["much", 5250, 5500]],
]
EXPECTED = [  # (speaker, role, text) in audio order
    ("Alex", "agent", "thank you for calling"),
    ("Dana", "customer", "hi my card declined"),
    ("Alex", "agent", "let me check that for you"),
    ("Dana", "customer", "okay"),
    ("Dana", "customer", "thanks so much"),
    ("Alex", "agent", "all fixed goodbye"),
]

STARTS = [200, 1500, 2600, 3100, 4800, 5800]  # their start times (ms on the call clock)

T = TypeVar("T")


class TwoVoiceEngine:
    """A scripted engine with its own script per channel (a conversation, not an echo)."""

    name = "scripted"

    def __init__(self, scripts: dict[int, Script], final_delay_ms: int = 300) -> None:
        self.scripts = scripts
        self.final_delay_ms = final_delay_ms

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def open_session(self, params: SessionParams) -> ScriptedSession:
        return ScriptedSession(params, self.scripts[params.channel], self.final_delay_ms)


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(
            name
            for name, path in (("chromium", chromium), ("chromedriver", driver))
            if path is None
        )
        pytest.fail(
            f"{missing} not found: the dashboard browser test needs Debian's chromium and "
            f"chromium-driver packages; install them with `sudo {SETUP}`",
            pytrace=False,
        )
    return chromium, driver


def _start_chromium() -> Any:
    """Headless Chromium at 1280x800; a missing browser or selenium fails (does not skip)."""
    chromium, chromedriver = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `.venv/bin/pip install -e '.[dev]'`", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,800",
        "--lang=en-US",
        # A page left for another stays alive in the back-forward cache with its EventSources
        # open; the gateway's shutdown would then wait for those streams.
        "--disable-features=BackForwardCache",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    # --window-size is the whole window; the page itself gets exactly 1280x800.
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
    )
    return browser


class Page:
    """The browser, driven from the event loop: each WebDriver call runs in a thread."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def open(self, url: str) -> None:
        await self._call(self.browser.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        return await self._call(self.browser.execute_script, script, *args)

    async def wait_js(self, script: str, within_s: float = 15.0) -> Any:
        """Poll ``script`` until it returns something truthy; that value."""
        deadline = time.monotonic() + within_s
        while True:
            value = await self.js(script)
            if value:
                return value
            if time.monotonic() > deadline:
                text = await self.js("return document.body.innerText")
                raise AssertionError(f"page never satisfied {script!r}; it shows:\n{text}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> bytes:
        png: bytes = await self._call(self.browser.get_screenshot_as_png)
        await asyncio.to_thread(path.write_bytes, png)
        return png


# Records, from the moment it is installed, every partial the page shows, and any partial shown
# for a turn that is already final (pending in the live area or released into the transcript).
WATCH = """
window.__partials = [];
window.__stale = [];
const done = new Set();
const check = () => {
  for (const li of document.querySelectorAll('#finals li')) {
    for (const k of li.dataset.turns.split(' ')) done.add(k);
  }
  for (const s of document.querySelectorAll('#lanes .pending')) done.add(s.dataset.key);
  for (const s of document.querySelectorAll('#lanes .partial')) {
    window.__partials.push([s.dataset.key, s.textContent]);
    if (done.has(s.dataset.key)) window.__stale.push([s.dataset.key, s.textContent]);
  }
};
new MutationObserver(check).observe(document.getElementById('call-pane'),
  {subtree: true, childList: true, characterData: true, attributes: true});
"""

FINALS = """
return [...document.querySelectorAll('#finals li')].map((li) => [
  li.querySelector('.ts').textContent, li.querySelector('.spk').textContent,
  li.dataset.role, li.querySelector('.txt').textContent]);
"""


def _lines(finals: list[list[str]]) -> list[tuple[str, str, str]]:
    return [(speaker, role, text) for _, speaker, role, text in finals]


def _drop_call_feeds(gw: Gateway, call_id: str) -> int:
    """End the server side of the call's live subscriptions, as a network drop would."""
    publisher = gw.app[HUB]._publishers[call_id]  # no public way to drop a subscriber
    subs = list(publisher.subscribers)
    for sub in subs:
        sub.close("test_drop")
    return len(subs)


async def _stored_transcript(gw: Gateway) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(f"{gw.http}/v1/calls/{CALL_SID}/transcript") as resp:
            assert resp.status == 200, await resp.text()
            doc: dict[str, Any] = await resp.json()
            return doc


async def _watch_call(gw: Gateway, page: Page, tmp_path: Path) -> dict[str, Any]:
    """Open the page, stream the call, check it mid-call; what the page showed."""
    await page.open(f"{gw.http}/?token={API_TOKEN}")
    await page.wait_js("return document.getElementById('fh-conn').dataset.state == 'connected'")
    # The token left the address bar for localStorage.
    assert "token" not in await page.js("return location.href")

    messages = call_messages(
        CALL_SID,
        CALL_S,
        params={"inbound_participant": "Dana", "outbound_participant": "Alex"},
    )
    sender = asyncio.create_task(send_messages(gw.ws(), messages, interval_s=0.0095))
    await poll_until(lambda: gw.registry.get(CALL_SID) is not None)

    # The firehose brings the new call into the list; choose it with a click.
    found = await page.wait_js(
        "return [...document.querySelectorAll('#calls button')]"
        f".find((b) => b.textContent.includes('{CALL_SID}'))"
    )
    assert "active" in (await asyncio.to_thread(lambda: found.text)).lower()
    await asyncio.to_thread(found.click)
    live_call = gw.registry.get(CALL_SID)
    assert live_call is not None
    await page.wait_js("return location.hash.startsWith('#call=')")
    await page.wait_js("return document.getElementById('call-conn').dataset.state == 'connected'")
    await page.js(WATCH)

    # A dropped feed: the page shows it, EventSource resumes by itself (Last-Event-ID), and
    # nothing shown twice (checked at the end: each final exactly once).
    await page.wait_js("return document.querySelectorAll('#finals li').length >= 1")
    assert _drop_call_feeds(gw, live_call.call_id) == 1
    await page.wait_js(
        "return document.getElementById('call-conn').textContent.includes('reconnecting')"
    )
    await page.wait_js(
        "return document.getElementById('call-conn').dataset.state == 'connected'", within_s=10
    )

    # Mid-call: three finals shown, in audio order, the call still streaming.
    await page.wait_js("return document.querySelectorAll('#finals li').length >= 3")
    mid = await page.js(FINALS)
    assert live_call.state.value == "active" and not sender.done()
    assert len(mid) < len(EXPECTED), "the call should still be going"
    assert _lines(mid) == EXPECTED[: len(mid)]
    assert [ts for ts, *_ in mid] == [f"[00:{ms / 1000:04.1f}]" for ms in STARTS[: len(mid)]]
    # The screenshot: Dana's "okay" in place (final at ~3.7 s, it waited for Alex's turn that
    # started earlier and was final at ~4.5 s) and a partial in the live area.
    await page.wait_js("return document.querySelectorAll('#finals li').length >= 4")
    await page.wait_js("return document.querySelector('#lanes .partial')")
    png = await page.screenshot(tmp_path / "dashboard.png")
    assert png.startswith(b"\x89PNG")
    await asyncio.to_thread(ARTIFACTS.mkdir, exist_ok=True)
    await asyncio.to_thread(
        shutil.copyfile, tmp_path / "dashboard.png", ARTIFACTS / "dashboard.png"
    )

    closed = await sender
    assert closed.code == 1000
    await gw.idle()
    await page.wait_js(
        "return document.getElementById('call-conn').textContent.includes('call ended')"
    )
    final = await page.js(FINALS)
    doc = await _stored_transcript(gw)
    # The list shows the end too (call.ended on the firehose).
    await page.wait_js(
        f"return document.querySelector('#calls button[data-id=\"{live_call.call_id}\"] .badge')"
        ".textContent == 'ended'"
    )
    await page.screenshot(tmp_path / "dashboard-ended.png")

    partials = await page.js("return window.__partials")
    stale = await page.js("return window.__stale")
    live_left = await page.js("return document.querySelectorAll('#lanes span[data-key]').length")

    # A wrong token: a clear 401 message, not an empty page.
    await page.open(f"{gw.http}/?token=wrong-token#call={CALL_SID}")
    alert = await page.wait_js(
        "const a = document.getElementById('alert'); return !a.hidden && a.textContent"
    )
    assert "Not authorized (401" in alert and "token" in alert
    return {
        "final": final,
        "doc": doc,
        "partials": partials,
        "stale": stale,
        "live_left": live_left,
    }


async def _run_call(browser: Any, tmp_path: Path) -> dict[str, Any]:
    engine = TwoVoiceEngine({0: parse_script(CUSTOMER), 1: parse_script(AGENT)})
    # A short keepalive: an SSE handler notices a closed page at its next keepalive write, and the
    # gateway's shutdown waits for every handler.
    settings = settings_for(tmp_path, api={"tokens": [API_TOKEN]}, live={"keepalive_s": 0.5})
    page = Page(browser)
    async with running_gateway(settings, engine) as gw:
        try:
            seen = await _watch_call(gw, page, tmp_path)
        finally:
            # Close the page's live feeds first: the server's shutdown waits for open streams.
            await page.open("about:blank")
    return seen


async def test_dashboard_follows_a_live_call(tmp_path: Path) -> None:
    browser = await asyncio.to_thread(_start_chromium)
    try:
        seen = await _run_call(browser, tmp_path)
    finally:
        await asyncio.to_thread(browser.quit)
    final = seen["final"]

    assert _lines(final) == EXPECTED  # every final once, in audio order, with its speaker
    assert [(u["speaker"], u["role"], u["text"]) for u in seen["doc"]["utterances"]] == EXPECTED
    assert [ts for ts, *_ in final] == [f"[00:{ms / 1000:04.1f}]" for ms in STARTS]
    assert seen["partials"], "no partial was ever shown"
    assert any(text.startswith("let me") for _, text in seen["partials"])
    assert not seen["stale"], f"partials shown for turns already final: {seen['stale']}"
    assert seen["live_left"] == 0  # the live area is empty once the call has ended


async def test_dashboard_adds_a_lane_when_a_leg_joins_mid_call(tmp_path: Path) -> None:
    """A SIPREC call gains a third participant (a re-INVITE appends an m-line): the open
    dashboard grows a third lane under the new participant's name, and that leg's finals show
    in the transcript with its speaker."""
    settings = siprec_settings(tmp_path, sections={"live": {"keepalive_s": 0.5}})
    silence = b"\x00\x00" * 8000  # 1 s of 8 kHz PCM16
    browser = await asyncio.to_thread(_start_chromium)
    page = Page(browser)
    try:
        async with siprec_gateway(settings, hello_engine()) as (gw, svc):
            try:
                target = ("127.0.0.1", svc.sip_ports["udp"])
                client = await SipUdpClient.open()
                dialog, ok = await establish(client, target)
                two = [("127.0.0.1", p) for p in answer_ports(ok)]
                await play_rtp(two, [silence, silence], speed=2.0)
                call = gw.registry.get(dialog.call_id)
                assert call is not None
                await page.open(f"{gw.http}/#call={call.call_id}")
                await page.wait_js("return document.querySelectorAll('#lanes .lane').length == 2")

                names = (*NAMES, "Carol Supervisor")
                aors = (*AORS, "sip:supervisor-2@pbx.example")
                reinvite = dialog.reinvite((30000, 30002, 30004), metadata=rs_metadata(names, aors))
                client.send(reinvite, target)
                joined = await client.expect(200)
                client.send(dialog.ack(), target)
                await page.wait_js("return document.querySelectorAll('#lanes .lane').length == 3")
                lane = await page.js(
                    "return document.querySelector('#lanes .lane[data-channel=\"2\"] .spk')"
                    ".textContent"
                )
                assert lane == "Carol Supervisor"
                three = [("127.0.0.1", p) for p in answer_ports(joined)]
                await play_rtp(three, [silence * 2, silence * 2, silence * 2])
                client.send(dialog.bye(), target)
                await client.expect(200)
                await gw.idle()
                finals = await page.wait_js(
                    "const s = [...document.querySelectorAll('#finals li .spk')]"
                    ".map((e) => e.textContent); "
                    "return s.includes('Carol Supervisor') && s"
                )
                assert finals.count("Carol Supervisor") >= 1
                client.close()
            finally:
                await page.open("about:blank")
    finally:
        await asyncio.to_thread(browser.quit)
