"""`moemesh serve` (issue 20) as a client sees it: the official `openai` client against a real
server process on loopback (and a 2-node cluster in a private network namespace). Answers are
checked against the engine run in this process on the same prompt, token for token."""
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from support import MOEMESH, TESTS, ServeProcess, require_tools, wait_until

openai = pytest.importorskip("openai")

from coordinator import Engine, harmony  # noqa: E402
from coordinator.sampling import SamplingParams  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(300)
KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = ServeProcess("-m", str(tiny_dir), "--parallel", "4", "--api-key", KEY)
    yield s
    s.stop()
    s.log.close()


@pytest.fixture(scope="module")
def local(tiny_dir):
    return Engine.load(tiny_dir, precision="fast"), Tokenizer.from_dir(tiny_dir)


def expected_chat(local, messages, max_tokens, **render):
    """The answer the engine gives alone: (final text, reasoning text, completion tokens)."""
    engine, tok = local
    prompt = harmony.render_prompt(tok, messages, **render)
    parser = harmony.StreamParser(tok)
    deltas, n = [], 0
    for step in engine.stream(prompt, max_tokens, SamplingParams(temperature=0), harmony.STOP_IDS):
        deltas += parser.feed(step.token)
        n += 1
    deltas += parser.feed(harmony.END)
    final = "".join(d.text for d in deltas if d.channel != "analysis" and not d.recipient)
    return final, "".join(d.text for d in deltas if d.channel == "analysis"), n


def test_models_health_and_page(server, tiny_dir):
    assert [m.id for m in server.client(KEY).models.list().data] == [tiny_dir.name]
    assert server.get("/health")["status"] == "ok"
    with urllib.request.urlopen(server.url + "/", timeout=30) as r:
        assert b"chat.js" in r.read()


def test_chat_completion_streamed_and_not_equals_the_engine(server, local):
    client = server.client(KEY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    reply = client.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=0)
    final, reasoning, n = expected_chat(local, [harmony.Message("user", "What is 2+2?")], 12,
                                        instructions="Be brief.")
    assert reply.choices[0].message.content == final
    assert (getattr(reply.choices[0].message, "reasoning_content", None) or "") == reasoning
    assert reply.usage.completion_tokens == n and reply.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == final
    assert chunks[-1].usage.completion_tokens == n


def test_completion_equals_the_engine(server, local):
    engine, tok = local
    reply = server.client(KEY).completions.create(model="x", prompt="Once upon a time", max_tokens=10, temperature=0)
    ids = [s.token for s in engine.stream(tok.encode("Once upon a time"), 10, SamplingParams(temperature=0))]
    assert reply.choices[0].text == tok.decode(ids)
    streamed = server.client(KEY).completions.create(model="x", prompt="Once upon a time", max_tokens=10,
                                                  temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == tok.decode(ids)


def test_tool_call_history_and_tools_are_rendered_and_answered(server, local):
    """A tool-call round trip's second half: the assistant's call and the tool's result go back
    in; the answer is what the engine gives on that conversation rendered with the tools."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Gets the weather.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'}]
    reply = server.client(KEY).chat.completions.create(model="x", messages=messages, tools=tools, max_tokens=8,
                                                    temperature=0)
    history = [harmony.Message("user", "Weather in Paris?"),
               harmony.Message("assistant", '{"city":"Paris"}', "commentary", "functions.get_weather", "<|constrain|>json"),
               harmony.Message("functions.get_weather", '{"temp": 20}', "commentary", "assistant")]
    final, _, _ = expected_chat(local, history, 8, tools=[harmony.Tool("get_weather", "Gets the weather.",
                                                                       tools[0]["function"]["parameters"])])
    assert reply.choices[0].message.content == final


def test_bad_requests_and_keys(server):
    client = server.client(KEY)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="x", messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="x", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{not json",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    long = "word " * 2000  # beyond the tiny model's 1024-token context
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": long}], max_tokens=4)


def test_concurrent_clients_get_their_sequential_answers(server):
    client = server.client(KEY)
    questions = [f"Question number {i}: tell me about {w}." for i, w in enumerate(["cats", "rivers", "MoE", "tea"])]
    ask = lambda q: client.chat.completions.create(  # noqa: E731
        model="x", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0,
        seed=1).choices[0].message.content
    sequential = [ask(q) for q in questions]
    concurrent = [None] * 4

    def run(i):
        concurrent[i] = ask(questions[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert concurrent == sequential


def test_a_client_that_disconnects_frees_its_slot(server):
    stream = server.client(KEY).chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Write forever."}], max_tokens=100000, stream=True)
    next(iter(stream))
    assert server.get("/health")["slots_busy"] == 1
    stream.close()
    assert wait_until(lambda: server.get("/health")["slots_busy"] == 0, 10)


def test_other_hosts_need_a_key(tiny_dir):
    out = subprocess.run(MOEMESH + ["serve", "-m", str(tiny_dir), "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60, cwd=TESTS,
                         env={k: v for k, v in __import__("os").environ.items() if k != "MOEMESH_API_KEY"})
    assert out.returncode == 2 and "--api-key" in out.stderr


NAMESPACE_CLIENT = """
import json, sys, threading, urllib.request
import openai
url = sys.argv[1]
client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
answers = [None, None]
def run(i):
    answers[i] = client.chat.completions.create(model="x", messages=[{"role": "user", "content": f"Hello {i}"}],
                                                max_tokens=10, temperature=0).choices[0].message.content
threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
for t in threads: t.start()
for t in threads: t.join(120)
devices = json.loads(urllib.request.urlopen(url + "/api/devices", timeout=30).read())["devices"]
print(json.dumps({"answers": answers, "devices": devices}))
"""


def test_cluster_in_a_private_namespace_serves_the_same_answers(tiny_dir, netns, start_node, local):
    """Two nodes, the server and its clients all inside a network namespace: two concurrent
    requests share the cluster's rounds and get the single-device answers."""
    nodes = [start_node("--insecure", "--no-mdns", "--host", "127.0.0.1", netns=netns) for _ in range(2)]
    server = ServeProcess("-m", str(tiny_dir), "--cluster", "--insecure", *[a for n in nodes for a in ("--node", n.address)],
                          "--no-api-key", netns=netns)
    try:
        out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", NAMESPACE_CLIENT, server.url],
                             capture_output=True, text=True, timeout=240)
        log = server.stderr()
    finally:
        server.stop()
        server.log.close()
    assert out.returncode == 0, out.stderr + log
    result = json.loads(out.stdout)
    for i in range(2):
        assert result["answers"][i] == expected_chat(local, [harmony.Message("user", f"Hello {i}")], 10)[0]
    assert [d["up"] for d in result["devices"]] == [True, True, True]


def test_chat_page_in_a_real_browser(server):
    """Debian's chromium, headless, driven by selenium: load the page, send a message, see the
    streamed answer with its token rate; the screenshot is kept in tests/artifacts."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    require_tools("chromium", "chromedriver", install="apt-get install chromium chromium-driver")
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        driver.find_element(By.ID, "input").send_keys("Hello from the browser")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "tok/s" in d.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text)
        answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
        wait.until(lambda d: "coordinator" in d.find_element(By.ID, "devices").text)  # fetched after the key
        artifacts = TESTS / "artifacts"
        artifacts.mkdir(exist_ok=True)
        driver.save_screenshot(str(artifacts / "chat-page.png"))
    finally:
        driver.quit()
    assert answer.strip()


def test_a_full_server_answers_503(tiny_dir):
    """One slot and a line of four: of eight requests sent at once (each generating for seconds),
    the ones beyond five are refused with 503 at once; the others are answered."""
    full = ServeProcess("-m", str(tiny_dir), "--parallel", "1", "--no-api-key", "--draft", "0")
    try:
        client = full.client("none")
        outcomes = []

        def ask():
            try:
                client.completions.create(model="x", prompt="Go on", max_tokens=900)
                outcomes.append(200)
            except openai.APIStatusError as e:
                outcomes.append((e.status_code, str(e)))
        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        full.stop()
        full.log.close()
    refused = [o for o in outcomes if o != 200]
    assert len(outcomes) == 8 and 1 <= len(refused) <= 3 and outcomes.count(200) >= 5
    assert all(code == 503 and "busy" in text for code, text in refused)
