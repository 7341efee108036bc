"""The dashboard and chat pages of `kimi-cluster serve --workers 2`, in a real browser: Debian's headless
chromium driven through its own chromedriver (nothing is downloaded at run time). Screenshots go to
$DASHBOARD_SCREENSHOTS, else to the test run's temporary folder."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.scripted_models import QUESTION, REASONING, SCRIPTED_CONTEXT, scripted_servers, write_scripted_models
from tests.test_api import KEY as SCRIPTED_KEY
from tests.test_serve import cli, descendants, expert_worker_pids, start, stop

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
API_KEY = "dashboard-test-key"
KEY_HEADER = {"Authorization": f"Bearer {API_KEY}"}
NODES = ("head", "worker-1", "worker-2")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402 - only once the browser is known to be there
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture(scope="module")
def served(make_tiny):
    process = start(cli("serve", str(make_tiny("Q4_K_M")), "--workers", "2", "--port", "0", "--threads", "1"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                    env={**os.environ, "KIMI_API_KEY": API_KEY})
    try:
        url = printed_url(process)
        # The console must not fill its pipe while the tests run (it writes a line per request).
        threading.Thread(target=process.stderr.read, daemon=True).start()
        bring_up = statuses_until_ready(url, process)
        yield url, process, bring_up
    finally:
        stop(process)


def printed_url(process: subprocess.Popen) -> str:
    """The address a starting `serve` prints first, before its model loads."""
    for line in process.stderr:
        if (match := re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)):
            return match.group(1)
    raise AssertionError("serve did not print its address")


def statuses_until_ready(url: str, process: subprocess.Popen, timeout_s: float = 120) -> list[dict]:
    """GET /status, as the dashboard asks it, until the server is ready: what it said meanwhile."""
    said = []
    deadline = time.monotonic() + timeout_s
    while not said or said[-1]["state"] != "ok":
        assert process.poll() is None and time.monotonic() < deadline, "serve did not become ready"
        said.append(httpx.get(f"{url}/status", headers=KEY_HEADER, timeout=30).json())
        time.sleep(0.1)
    return said


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000"):
        options.add_argument(argument)  # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_until(condition, what: str, timeout_s: float = 60):
    """condition()'s first truthy value, asked every 0.1 s (the machine may be busy: deadlines are generous)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.1)
    return value


def node_states(browser) -> dict[str, str]:
    """The dashboard's node table: node -> the state it shows (read in one go: the page redraws it every poll)."""
    return browser.execute_script("""return Object.fromEntries([...document.querySelectorAll('#nodes tbody tr')]
        .map((row) => [row.dataset.node, row.querySelector('.node-state .badge').textContent]))""")


def key_form_shown(browser):
    """The form asking for the API key, if the page shows it."""
    forms = browser.find_elements(By.ID, "key-form")
    return forms[0] if forms and forms[0].is_displayed() else None


def open_with_key(browser, url: str, key: str = API_KEY) -> None:
    """Open the page with the key kept in the browser, as it is after the user entered it once."""
    browser.get(url)
    browser.execute_script("localStorage.setItem('kimi-cluster-api-key', arguments[0])", key)
    browser.get(url)


def set_field(browser, field_id: str, value: str) -> None:
    field = browser.find_element(By.ID, field_id)
    field.clear()
    field.send_keys(value)


def test_the_page_without_a_key_asks_for_one_and_keeps_it(served, browser, screenshots):
    url, _, _ = served
    browser.get(f"{url}/")
    browser.execute_script("localStorage.clear()")
    browser.get(f"{url}/")
    form = wait_until(lambda: key_form_shown(browser), "the key form")
    browser.save_screenshot(str(screenshots / "key-form.png"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")  # nothing shown without the key
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    form.find_element(By.TAG_NAME, "button").click()
    wait_until(lambda: len(node_states(browser)) == len(NODES), "the nodes after the key was given")
    browser.get(f"{url}/")  # kept: asked once
    wait_until(lambda: len(node_states(browser)) == len(NODES), "the nodes with the kept key")
    assert not key_form_shown(browser)


def test_the_dashboard_lists_every_node_with_its_experts(served, browser, screenshots):
    url, _, _ = served
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Spread the experts", "max_tokens": 16},
                       headers=KEY_HEADER, timeout=120)
    assert reply.status_code == 200
    open_with_key(browser, f"{url}/")
    assert wait_until(lambda: node_states(browser) == dict.fromkeys(NODES, "ok") or None, "every node ok")
    # The placement grid has a column per node; the heat map counts the request's routing; speed was sampled.
    header = browser.find_element(By.CSS_SELECTOR, "#placement thead").text.split()
    assert header == ["Layer", *NODES]
    wait_until(lambda: "picks this run" in browser.find_element(By.ID, "heat-note").text, "the heat map")
    wait_until(lambda: browser.find_element(By.CSS_SELECTOR, "#chart-decode_tps .value").text != "–",
               "a speed sample")
    browser.save_screenshot(str(screenshots / "dashboard.png"))
    browser.set_window_size(390, 844)  # a phone
    try:
        time.sleep(0.5)  # let the page lay itself out again before the picture
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        browser.save_screenshot(str(screenshots / "dashboard-phone.png"))
    finally:
        browser.set_window_size(1280, 1000)


# Records, in the page, the reply's length at every change while it has no stats line yet: a reply that streams
# shows several; one that arrived whole, one. (Polling from the test could miss a fast reply's steps.)
RECORD_STREAMING = """window.streamed = new Set();
new MutationObserver(() => {
  const replies = document.querySelectorAll('.message.assistant');
  const last = replies[replies.length - 1], content = last && last.querySelector('.content');
  if (content && !last.querySelector('.stats')) window.streamed.add(content.textContent.length);
}).observe(document.body, {subtree: true, childList: true, characterData: true});"""


def assistant_stats(browser) -> list[str]:
    return [stats.text for stats in browser.find_elements(By.CSS_SELECTOR, ".message.assistant .stats")]


def test_a_chat_message_streams_a_reply_and_stop_ends_one(served, browser, screenshots):
    url, _, _ = served
    open_with_key(browser, f"{url}/chat")
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    set_field(browser, "max_tokens", "48")
    browser.execute_script(RECORD_STREAMING)
    browser.find_element(By.ID, "prompt").send_keys("Tell me about pooled memory")
    browser.find_element(By.ID, "send").click()
    stats = wait_until(lambda: assistant_stats(browser), "the reply to end", timeout_s=120)[0]
    # A random model: it may end with its end-of-text token before max_tokens.
    ended = r"first token after [\d.]+ s · \d+ tokens · [\d.]+ tokens/s · ended: (length|stop)"
    assert re.fullmatch(ended, stats), stats
    streamed = set(browser.execute_script("return [...window.streamed]")) - {0}
    assert len(streamed) >= 2, f"the reply did not appear bit by bit (lengths shown before it ended: {streamed})"
    browser.save_screenshot(str(screenshots / "chat.png"))

    # Stop, pressed while a long reply streams. A random model may end a reply by itself before the press lands:
    # then the next one is asked for.
    set_field(browser, "max_tokens", "4000")
    stop_button = browser.find_element(By.ID, "stop")
    for attempt in range(5):
        replies = len(assistant_stats(browser))
        browser.find_element(By.ID, "prompt").send_keys(f"And a long answer, please ({attempt})")
        browser.find_element(By.ID, "send").click()
        wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant .content")) > replies
                   and browser.find_elements(By.CSS_SELECTOR, ".message.assistant .content")[-1].text, "a reply")
        if stop_button.is_enabled():
            stop_button.click()
        last = wait_until(lambda: assistant_stats(browser)[replies:], "the reply's end")[0]
        if last.endswith("stopped"):
            break
    assert last.endswith("stopped"), last


def test_a_killed_worker_shows_degraded_and_ok_again_once_it_rejoins(served, browser, screenshots):
    url, process, _ = served
    open_with_key(browser, f"{url}/")
    wait_until(lambda: node_states(browser) == dict.fromkeys(NODES, "ok") or None, "every node ok")
    victim = sorted(set(expert_worker_pids()) & descendants(process.pid))[0]
    os.kill(victim, signal.SIGKILL)
    # A request that meets the dead worker has its share computed elsewhere and the worker brought back.
    request = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",), kwargs=dict(
        json={"prompt": "Carry on without it", "max_tokens": 16}, headers=KEY_HEADER,
        timeout=120))
    request.start()
    degraded = wait_until(lambda: [node for node, state in node_states(browser).items() if state == "degraded"],
                          "a degraded worker", timeout_s=30)
    browser.save_screenshot(str(screenshots / "dashboard-degraded.png"))
    assert degraded[0] in NODES[1:]
    request.join(timeout=120)
    wait_until(lambda: node_states(browser) == dict.fromkeys(NODES, "ok") or None, "the worker back", timeout_s=120)
    events = wait_until(lambda: "is back" in browser.find_element(By.ID, "events").text
                        and browser.find_element(By.ID, "events").text, "the rejoin in the events")
    assert f"{degraded[0]} is down" in events and f"{degraded[0]} is back" in events
    browser.save_screenshot(str(screenshots / "dashboard-rejoined.png"))


def test_the_pages_are_package_files_served_without_the_key_and_status_asks_for_it(served):
    url, _, _ = served
    static = Path(__file__).parent.parent / "cluster" / "server" / "static"
    for path, name in (("/", "dashboard.html"), ("/chat", "chat.html"), ("/static/dashboard.js", "dashboard.js")):
        page = httpx.get(f"{url}{path}", timeout=30)
        assert page.status_code == 200 and page.text == (static / name).read_text()
    for page in [*static.glob("*.html"), *static.glob("*.js"), *static.glob("*.css")]:
        assert "http://" not in page.read_text() and "https://" not in page.read_text(), f"{page} links outside"
    assert httpx.get(f"{url}/status", timeout=30).status_code == 401
    status = httpx.get(f"{url}/status", headers=KEY_HEADER, timeout=30).json()
    assert [node["name"] for node in status["nodes"]] == list(NODES)


def test_while_the_model_loads_the_status_shows_the_nodes_loading(served):
    _, _, bring_up = served
    assert bring_up[0]["state"] == "loading"
    loading = [status for status in bring_up if status["state"] == "loading" and status["nodes"]]
    assert loading, "no status listed the nodes while they loaded"
    nodes = loading[-1]["nodes"]
    assert [node["name"] for node in nodes] == list(NODES) and {node["state"] for node in nodes} == {"loading"}
    # A worker's share loaded so far, once it has said (the head's own is not counted).
    assert all(node["loaded"] is None or 0 <= node["loaded"] <= 1 for node in nodes)


def test_the_chat_page_folds_the_reasoning_and_shows_the_tool_call(browser, screenshots, tmp_path_factory):
    """A scripted thinking model reasons "Paris is in France." and then calls get_weather."""
    thinker = write_scripted_models(tmp_path_factory.mktemp("scripted"))["thinker"]
    with scripted_servers({"thinker": thinker}, SCRIPTED_CONTEXT) as servers:
        open_with_key(browser, f"{servers['thinker'].url}/chat", SCRIPTED_KEY)
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
        set_field(browser, "temperature", "0")
        set_field(browser, "tools", json.dumps([WEATHER]))
        browser.find_element(By.ID, "prompt").send_keys(QUESTION)
        browser.find_element(By.ID, "send").click()
        stats = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".message.assistant .stats"), "the reply")
        assert stats[0].text.endswith("ended: tool_calls")
        reasoning = browser.find_element(By.CSS_SELECTOR, ".message.assistant details.reasoning")
        assert reasoning.is_displayed() and reasoning.get_attribute("open") is None  # shown folded
        assert reasoning.get_attribute("textContent") == "Reasoning" + REASONING
        call = browser.find_element(By.CSS_SELECTOR, ".message.assistant .tool-call").text
        assert call == 'tool call: get_weather({"city": "Paris"})'
        reasoning.find_element(By.TAG_NAME, "summary").click()
        browser.save_screenshot(str(screenshots / "chat-reasoning-and-tool-call.png"))
