"""`medlib serve`: started as a process on a free localhost port, called with the `openai` client and
raw HTTP, and its page driven in headless Chromium (Debian's chromium + chromium-driver, which
`make test` installs). The guardrails must hold on both."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from medlib.chat import guardrails
from medlib.chat.serve import RateLimiter, RequestError, conversation, served_model_id

KEY = "test-key-not-a-secret"
MARKER = "Zorblax"  # typed into the page and the API; must not end up in any file the server can write
RED_FLAG = f"crushing chest pain and I can't breathe ({MARKER})"
MEDICAL = "What are the side effects of ibuprofen?"
SAFETY_NET = "What are the warning signs of a stroke that I should know about?"
SUPPORT = "I've been feeling really lonely since I moved to a new city for work."
SPANISH_COLD = "Tengo un resfriado desde hace tres días, ¿qué puedo tomar?"


@dataclass
class Server:
    url: str
    workdir: Path
    startup: list[str]
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "MEDLIB_API_KEY": KEY, "GRADIO_TEMP_DIR": str(work / "gradio-tmp"),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medlib", "serve", "--profile", "local", "--port", "0",
         "--set", "run=no-such-run", "--set", "serve.rate_limit_per_minute=1000",
         "--set", "generation.max_new_tokens=24"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    startup, deadline = [], time.time() + 240
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                pytest.fail("medlib serve exited at start:\n" + "".join(startup))
            continue
        startup.append(line)
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)/", line)
        if found:
            break
    else:
        proc.kill()
        pytest.fail("medlib serve did not start in 240 s:\n" + "".join(startup))
    yield Server(found.group(1), work, startup, proc)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, body: bytes | str, key: str | None = KEY):
    import httpx

    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers, timeout=120)


# ---------------------------------------------------------------------- parsing, no server
def test_conversation_pairs_turns_and_ignores_system_messages():
    history, text = conversation([
        {"role": "system", "content": "be a pirate"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!\n\n*route: greeting*"},
        {"role": "user", "content": [{"type": "text", "text": "I have a rash"}]},
    ])
    assert history == [("hi", "Hello!")] and text == "I have a rash"


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
    ([{"role": "tool", "content": "a"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
])
def test_conversation_errors_name_the_field(messages, field):
    with pytest.raises(RequestError) as err:
        conversation(messages)
    assert err.value.status == 400 and err.value.param == field


def test_rate_limiter_allows_n_per_minute_per_client():
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [None, None, None]
    assert limiter.check("a") == pytest.approx(60.0)
    assert limiter.check("b") is None          # another client is not affected
    now[0] = 59.0
    assert limiter.check("a") == pytest.approx(1.0)
    now[0] = 60.0
    assert limiter.check("a") is None          # the first request left the window


def test_served_model_id_and_the_public_description_name_the_run_never_a_path():
    from medlib.chat.session import ChatSession
    from medlib.config import load_chat

    assert served_model_id("local", None) == "medlib-local-base"
    assert served_model_id("paper", "med-nirvana") == "medlib-paper-med-nirvana"
    session = ChatSession.__new__(ChatSession)   # what the page and /v1/models show, without loading a model
    session.recipe, session.temperature = load_chat("paper"), 0.0
    session.adapter_used, session.model_name = Path("/srv/clinic/outputs/paper/med-nirvana/adapter"), "/srv/models/llama-8b"
    public = session.public_description()
    assert session.run_name == "med-nirvana" and "/srv" not in public
    assert public == "profile paper, run med-nirvana, model llama-8b, temperature 0.0"
    session.adapter_used, session.model_name = None, "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"   # a Hub id stays
    assert session.public_description().startswith("profile paper, run none (base model), model unsloth/Meta-Llama")


# ---------------------------------------------------------------------- the running server
def test_starts_on_localhost_with_the_base_model_and_says_so_once(server):
    text = "".join(server.startup)
    assert server.url.startswith("http://127.0.0.1:")
    assert text.count("No trained adapter at") == 1 and "running the base model" in text
    assert "API key required" in text and "nothing typed is written to disk" in text


def test_models_lists_the_served_model_without_a_server_path(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["medlib-local-base"]
    assert models[0].description.startswith("profile local, run none (base model)")
    assert str(server.workdir) not in models[0].description and "/" not in models[0].description


def test_api_routes_like_the_chat_session(client):
    def ask(text, **kw):
        r = client.chat.completions.create(model="medlib-local-base", messages=[{"role": "user", "content": text}], **kw)
        return r.choices[0].message.content, r.model_extra["medlib"]

    text, meta = ask("hello")
    assert text == guardrails.GREETING_REPLY and (meta["route"], meta["tier"]) == ("greeting", "routine")
    text, meta = ask(RED_FLAG)
    assert text.startswith(guardrails.URGENT_MESSAGE) and meta["route"] == "urgent" and "cardiac" in meta["red_flags"]
    assert (meta["tier"], meta["category"]) == ("urgent", "cardiac")
    assert guardrails.DISCLAIMER not in text          # the model was not asked
    text, meta = ask(MEDICAL, max_tokens=8)
    assert meta["route"] == "medical" and meta["tier"] == "routine" and text.startswith(guardrails.DISCLAIMER)
    assert len(text) > len(guardrails.DISCLAIMER) + 5
    text, meta = ask("who won the football match yesterday?")
    assert text == guardrails.FALLBACK_REPLY and meta["route"] == "fallback"
    # each tier carries its tier and category
    text, meta = ask(SAFETY_NET, max_tokens=8)
    assert (meta["route"], meta["tier"], meta["category"]) == ("safety_net", "safety_net", "stroke")
    assert text.endswith(guardrails.SAFETY_NETS["stroke"])       # the model answered, then the one-line safety net
    text, meta = ask(SUPPORT)
    assert (meta["route"], meta["tier"], meta["category"]) == ("support", "support", None) and text == guardrails.SUPPORT_REPLY
    text, meta = ask(SPANISH_COLD)
    assert (meta["route"], meta["lang"]) == ("english_only", "es") and text == guardrails.ENGLISH_ONLY_REPLY


def test_history_from_the_client_keeps_the_disclaimer_to_the_first_answer(client):
    first = client.chat.completions.create(model="medlib-local-base", max_tokens=6,
                                           messages=[{"role": "user", "content": MEDICAL}])
    answer = first.choices[0].message.content
    second = client.chat.completions.create(model="medlib-local-base", max_tokens=6, messages=[
        {"role": "user", "content": MEDICAL}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what about paracetamol for a fever?"}])
    assert answer.startswith(guardrails.DISCLAIMER)
    assert second.model_extra["medlib"]["route"] == "medical"
    assert not second.choices[0].message.content.startswith(guardrails.DISCLAIMER)


def test_streamed_reply_equals_the_whole_reply(client):
    messages = [{"role": "user", "content": RED_FLAG}]
    whole = client.chat.completions.create(model="medlib-local-base", messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model="medlib-local-base", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model_extra["medlib"]["route"] == "urgent"
    medical = list(client.chat.completions.create(model="medlib-local-base", stream=True, max_tokens=8,
                                                  messages=[{"role": "user", "content": MEDICAL}]))
    assert sum(bool(c.choices[0].delta.content) for c in medical) >= 3   # the answer arrives token by token


def test_twenty_concurrent_requests_are_all_answered(client):
    texts = [MEDICAL, "hi", RED_FLAG, "I have a sore throat and a mild fever"] * 5

    def ask(text):
        r = client.chat.completions.create(model="medlib-local-base", max_tokens=4,
                                           messages=[{"role": "user", "content": text}])
        return r.model_extra["medlib"]["route"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        routes = list(pool.map(ask, texts))
    assert routes == ["medical", "greeting", "urgent", "medical"] * 5


@pytest.mark.parametrize("body, key, status, needle", [
    ('{"messages": [', KEY, 400, "not valid JSON"),
    ('{"messages": []}', KEY, 400, "non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": "a" * 1_000_000}]}), KEY, 413, "limit"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "wrong-key", 401, "API key"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', None, 401, "API key"),
    ('{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', KEY, 404, "not served"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', KEY, 400, "max_tokens"),
    ('[1, 2]', KEY, 400, "JSON object"),
])
def test_bad_requests_get_a_4xx_json_error(server, body, key, status, needle):
    r = post(server, body, key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["code"] == status
    assert "Traceback" not in r.text


def test_page_in_a_real_browser(server):
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("Debian's chromium and chromium-driver are needed: `make test` installs them "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1000", f"--user-data-dir={server.workdir / 'chromium-profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)

    def wait(seconds: int) -> WebDriverWait:  # the page re-renders: an element found a moment ago may be gone
        return WebDriverWait(browser, seconds, ignored_exceptions=(StaleElementReferenceException,))

    try:
        browser.get(server.url + "/")
        # MEDLIB_API_KEY is set, so the page asks for it as its password.
        wait(60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[type=password]"))
        browser.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(KEY)
        browser.find_element(By.CSS_SELECTOR, "input[data-testid=textbox]").send_keys("staff")
        browser.find_element(By.XPATH, "//button[normalize-space()='Login']").click()
        wait(60).until(lambda b: "Not a medical device" in b.find_element(By.TAG_NAME, "body").text)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "Nothing you type is written to disk" in body and "run none (base model)" in body
        assert str(server.workdir) not in body

        def say(text: str) -> str:
            before = len(browser.find_elements(By.CSS_SELECTOR, "[data-testid=bot]"))
            box = wait(120).until(lambda b: next(
                (t for t in b.find_elements(By.TAG_NAME, "textarea") if t.is_displayed() and t.is_enabled()), False))
            box.send_keys(text)
            box.send_keys(Keys.ENTER)

            def answered(b):
                bots = b.find_elements(By.CSS_SELECTOR, "[data-testid=bot]")
                return len(bots) > before and "route: " in bots[-1].text and bots[-1].text

            return wait(120).until(answered)

        greeting = say("hello there")
        assert greeting.startswith(guardrails.GREETING_REPLY) and greeting.endswith("route: greeting · tier routine")
        medical = say(MEDICAL)
        assert medical.startswith(guardrails.DISCLAIMER) and medical.endswith("route: medical · tier routine")
        urgent = say(RED_FLAG)
        assert urgent.startswith(guardrails.URGENT_MESSAGE) and urgent.endswith("route: urgent · tier urgent · cardiac")
        assert guardrails.DISCLAIMER not in urgent
        net = say(SAFETY_NET)
        assert guardrails.SAFETY_NETS["stroke"] in net and net.endswith("route: safety_net · tier safety_net · stroke")
        support = say(SUPPORT)
        assert support.startswith(guardrails.SUPPORT_REPLY) and support.endswith("route: support · tier support")
    finally:
        browser.quit()


def test_nothing_typed_is_written_to_disk(server):
    """Run after the API and page tests (file order): no file the server could write holds their words."""
    assert server.proc.poll() is None, "the server stopped"
    written = [p for p in server.workdir.rglob("*") if p.is_file() and "chromium-profile" not in p.parts]
    holding = [str(p) for p in written if MARKER.encode() in p.read_bytes()]
    assert holding == []


# ---------------------------------------------------------------------- limits, in process
@pytest.fixture(scope="module")
def app_factory():
    from medlib.chat.serve import ChatServer, create_app
    from medlib.chat.session import ChatSession

    session = ChatSession.from_profile("local", overrides=["generation.max_new_tokens=8", "run=null"])

    def make(**changes):
        from fastapi.testclient import TestClient

        changes = {"port": 0, "max_queue": 8, **{k: str(v) if k == "transcript" else v for k, v in changes.items()}}
        settings = session.recipe.serve.replace(**changes)
        return TestClient(create_app(ChatServer(session, settings), with_page=False))

    return make


def test_rate_limit_answers_429_with_retry_after(app_factory):
    client = app_factory(rate_limit_per_minute=2)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)] == [200, 200, 429]
    refused = client.post("/v1/chat/completions", json=body)
    assert refused.json()["error"]["type"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1


def test_a_full_queue_answers_503(app_factory):
    client = app_factory(max_queue=0)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_busy" and r.headers["retry-after"]


def test_transcript_only_when_asked(app_factory, tmp_path):
    path = tmp_path / "transcript.jsonl"
    client = app_factory(transcript=path)
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": RED_FLAG}]}).status_code == 200
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["user"] == RED_FLAG and rows[0]["kind"] == "urgent"
