"""`tarkit app` in a real browser (headless Chromium through Selenium) and through gradio_client, served from the
QUICK demo's checkpoints: each tab answers, draws or edits what the pipelines would, a missing image is a
message in the page, and concurrent API calls wait in the queue. Screenshots land in each test's tmp folder.

Without chromium and chromedriver the browser tests are skipped with the line that installs them (`.ci/run`
installs them, so CI always runs them)."""

from __future__ import annotations

import shutil
import socket
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tarkit.cli import main
from tarkit_plugins.app_ui import NO_ANSWER, NO_IMAGE, Handlers, Models, build_app, serve
from tarkit_plugins.pipelines import EditPipeline

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 120  # seconds: generous, so a loaded machine is slow, never failing
QUESTION, PROMPT, INSTRUCTION = "Is there a red circle in the image?", "a photo of a red circle", "make it blue"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app(quick_demo):
    """The app on the QUICK demo's checkpoints, served in the background: (its URL, its models)."""
    checkpoints = quick_demo / "checkpoints"
    models = Models.load(checkpoints / "lm", checkpoints / "tatok", checkpoints / "ar_detok")
    blocks = build_app(models)
    url = serve(blocks, "127.0.0.1", free_port(), block=False)
    yield url, models
    blocks.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> str:
    """One rendered ShapesWorld scene, as the README's `tarkit shapesworld render` writes it."""
    out = tmp_path_factory.mktemp("scene")
    assert main(["shapesworld", "render", "--num", "1", "--out", str(out)]) == 0
    return str(out / "00000" / "samples" / "0000.png")


def start_browser(width: int = 1280, height: int = 900):
    """Headless Chromium driven by the system's chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("chromium and chromedriver are not installed: apt-get install chromium chromium-driver")
    driver = start_browser()
    yield driver
    driver.quit()


def wait_for(driver, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(condition)


def element(driver, css: str):
    """The element at ``css`` once it is shown."""
    from selenium.webdriver.common.by import By

    return wait_for(driver, lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()),
                                           None))


def open_tab(driver, url: str, title: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    tab = wait_for(driver, lambda d: next(
        (t for t in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == title), None))
    tab.click()


def upload(driver, component: str, path: str) -> None:
    """Choose ``path`` in the image component's file input and wait for its preview."""
    from selenium.webdriver.common.by import By

    wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"#{component} input[type=file]")).send_keys(path)
    element(driver, f"#{component} img")


def type_into(driver, component: str, words: str) -> None:
    box = element(driver, f"#{component} textarea")
    box.clear()
    box.send_keys(words)


def result_image(driver, component: str) -> np.ndarray:
    """The pixels of the image an output component shows, fetched from its URL as the browser did."""
    src = wait_for(driver, lambda d: element(d, f"#{component} img").get_attribute("src"))
    with urllib.request.urlopen(src, timeout=WAIT) as response:
        return np.asarray(Image.open(BytesIO(response.read())).convert("RGB"))


def ask(driver, url: str, scene: str, question: str = QUESTION) -> str:
    """The Ask tab: upload ``scene``, ask, wait for the answer."""
    open_tab(driver, url, "Ask about an image")
    upload(driver, "ask-image", scene)
    type_into(driver, "ask-question", question)
    element(driver, "#ask-button").click()
    return wait_for(driver, lambda d: element(d, "#ask-answer textarea").get_attribute("value"))


def generate(driver, url: str, prompt: str = PROMPT) -> np.ndarray:
    open_tab(driver, url, "Generate")
    type_into(driver, "generate-prompt", prompt)
    element(driver, "#generate-button").click()
    return result_image(driver, "generate-image")


def edit(driver, url: str, scene: str, instruction: str = INSTRUCTION) -> np.ndarray:
    open_tab(driver, url, "Edit")
    upload(driver, "edit-image", scene)
    type_into(driver, "edit-instruction", instruction)
    element(driver, "#edit-button").click()
    return result_image(driver, "edit-result")


def no_messages(driver) -> bool:
    """Whether the page shows no error or warning (a stray warning would be one the user cannot act on)."""
    from selenium.webdriver.common.by import By

    return not driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")


def saved_screenshot(driver, path: Path) -> Path:
    driver.execute_script("window.scrollTo(0, 0)")  # the whole tab from its top, whatever a click scrolled to
    assert driver.save_screenshot(str(path))
    assert Image.open(path).size[0] > 0
    return path


def seed_zero() -> torch.Generator:
    """The generator of the page's default seed."""
    return torch.Generator().manual_seed(0)


def test_the_page_answers_a_question_about_an_uploaded_image(browser, app, scene, tmp_path):
    url, models = app
    open_tab(browser, url, "Ask about an image")
    element(browser, "#ask-button").click()  # no image yet: a message in the page, no traceback
    toast = wait_for(browser, lambda d: element(d, "[data-testid=toast-text]").get_attribute("textContent"))
    assert toast.strip() == NO_IMAGE
    answer = ask(browser, url, scene)
    assert answer == (models.i2t.generate(scene, QUESTION) or NO_ANSWER)  # greedy: exactly the pipeline's answer
    saved_screenshot(browser, tmp_path / "app_ask.png")


def test_the_page_generates_an_image_from_a_prompt(browser, app, tmp_path):
    url, models = app
    shown = generate(browser, url)
    saved_screenshot(browser, tmp_path / "app_generate.png")
    assert no_messages(browser)
    # The page's defaults are the LM folder's record and seed 0: the very image the loaded pipeline draws.
    assert np.array_equal(shown, np.asarray(models.t2i.generate_image(PROMPT, seed_zero())))


def test_the_page_edits_the_uploaded_image(browser, app, scene, tmp_path):
    url, models = app
    shown = edit(browser, url, scene)
    saved_screenshot(browser, tmp_path / "app_edit.png")
    assert no_messages(browser)
    edited = models.pipeline(EditPipeline, models.defaults).edit(scene, INSTRUCTION, seed_zero())
    assert np.array_equal(shown, np.asarray(edited))


def test_gradio_client_calls_the_three_endpoints_and_concurrent_calls_queue(app, scene, tmp_path):
    url, models = app
    client = Client(url, verbose=False)
    defaults = models.defaults
    sampling = [defaults.scale, defaults.cfg_scale, defaults.temperature, defaults.top_k, defaults.top_p, 1, 0]
    answer = client.predict(handle_file(scene), QUESTION, api_name="/answer")
    assert isinstance(answer, str) and answer == Handlers(models).answer(scene, QUESTION)
    drawn = Image.open(client.predict(PROMPT, *sampling, api_name="/generate"))
    assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(models.t2i.generate_image(PROMPT, seed_zero())))
    edited = Image.open(client.predict(handle_file(scene), INSTRUCTION, *sampling, api_name="/edit"))
    assert edited.size == drawn.size
    jobs = [client.submit(PROMPT, *sampling[:-1], seed, api_name="/generate") for seed in range(3)]
    assert all(Image.open(job.result(timeout=WAIT)).size == drawn.size for job in jobs)  # queued, none refused
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(AppError, match=r"cannot read image .*pass an intact image file"):
        client.predict(handle_file(str(broken)), QUESTION, api_name="/answer")
    with pytest.raises(AppError, match=r"Value 0 is less than minimum value 1"):  # the slider's bound
        client.predict(PROMPT, *sampling[:5], 0, 0, api_name="/generate")
