"""The chat page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
send a message, watch the answer stream in, send a second one, stop a generation, start over.

Needs: apt-get install chromium chromium-driver; pip install selenium.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from api_support import TEMPLATE, ApiServer, make_stories_files

from dllama_py.generation.chat_session import ChatFormat
from dllama_py.text.tokenizer import Tokenizer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = os.environ.get("DLLAMA_SCREENSHOT")  # a path to save the page to, for a look


@pytest.fixture(scope="module")
def server(testdata: Path, tmp_path_factory):
    files = make_stories_files(testdata, tmp_path_factory.mktemp("stories"))
    # 25 ms per token, so the test sees an answer while it is still streaming
    api = ApiServer(
        *files, tmp_path_factory.mktemp("api_logs") / "api.log", "--debug-token-delay-ms", "25", api_key=None
    )
    yield api
    api.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} not found: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1000,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def wait_until(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def assistant_bubbles(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def watch_answer(driver, index: int) -> list[str]:
    """The texts the index-th answer showed while it streamed, until it finished."""
    seen: list[str] = []
    bubble = wait_until(
        lambda: len(assistant_bubbles(driver)) > index and assistant_bubbles(driver)[index],
        what=f"answer {index + 1}",
    )
    while "streaming" in (bubble.get_attribute("class") or ""):
        text = bubble.text
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        time.sleep(0.01)
    return seen


def test_chat_page_streams_answers_keeps_the_conversation_stops_and_starts_over(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    wait_until(lambda: browser.find_element(By.ID, "model").text == "stories260K", what="the model name")
    browser.find_element(By.ID, "settings").click()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max-tokens").send_keys("30")

    send(browser, "Tell me a story about a cat.")
    seen = watch_answer(browser, 0)
    assert len(seen) >= 3, f"the answer did not stream in: {seen}"  # it grew while streaming
    first = assistant_bubbles(browser)[0].text
    assert first and all(first.startswith(partial) for partial in seen)
    client = server.client()
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    expected = client.chat.completions.create(model="stories260K", messages=messages, temperature=0, max_tokens=30)
    assert first.startswith(
        expected.choices[0].message.content
    )  # then a note: "(stopped at the token limit)"

    send(browser, "What happened next?")
    watch_answer(browser, 1)
    second = assistant_bubbles(browser)[1].text
    messages += [
        {"role": "assistant", "content": expected.choices[0].message.content},
        {"role": "user", "content": "What happened next?"},
    ]
    expected = client.chat.completions.create(model="stories260K", messages=messages, temperature=0, max_tokens=30)
    assert second.startswith(expected.choices[0].message.content)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#messages .message")) == 4

    # stop a long answer: the generation ends on the server too
    cancelled = server.health().json()["requests"]["cancelled"]
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("400")
    send(browser, "Tell me a very long story.")
    wait_until(
        lambda: len(assistant_bubbles(browser)) == 3 and assistant_bubbles(browser)[2].text,
        what="the third answer to start",
    )
    browser.find_element(By.ID, "stop").click()
    wait_until(lambda: "(stopped)" in assistant_bubbles(browser)[2].text, what="the stopped note")
    assert browser.find_element(By.ID, "send").is_enabled()
    wait_until(
        lambda: server.health().json()["requests"]["cancelled"] == cancelled + 1,
        timeout=5,
        what="the server to cancel the generation",
    )
    assert not browser.find_element(By.ID, "error").is_displayed()

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .message") == []
    max_tokens.clear()
    max_tokens.send_keys("10")
    send(browser, "Hello")
    watch_answer(browser, 0)
    assert assistant_bubbles(browser)[0].text
    # the new conversation holds only this message: the usage line shows its prompt's token count
    prompt_tokens = len(
        ChatFormat(Tokenizer.load(server.tokenizer_path), TEMPLATE).encode(
            [{"role": "user", "content": "Hello"}]
        )
    )
    wait_until(
        lambda: browser.find_element(By.ID, "stats").text.startswith(f"{prompt_tokens} prompt tokens,"),
        what="the usage line",
    )
    if SCREENSHOT:
        browser.save_screenshot(SCREENSHOT)
