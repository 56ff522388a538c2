"""The studio page in a real browser: Debian's headless Chromium driven through Selenium and its
own chromedriver, against serve/config.local.yaml deployed on pusa-mini (local Ray, CPU replicas,
moto S3, the API key on). Everything the page does goes through the public HTTP API, so the
checks read the API (and the job store) as well as the page.

The screenshot of a finished job is saved as a test artifact: `out/artifacts/studio.png`, or under
`$PUSA_RAY_ARTIFACTS`; the README's picture is a copy of one.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import requests
from PIL import Image

from pusa_ray import storage
from pusa_ray.serving.jobs import JobStore
from tests.serve_helpers import API_KEY, REPO, deploy_on

pytestmark = [pytest.mark.browser, pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]

EXAMPLE = REPO / "pusa_ray" / "mini" / "examples" / "red-circle-right.png"
WINDOW = (1280, 1150)
ARTIFACTS = Path(os.environ.get("PUSA_RAY_ARTIFACTS", REPO / "out" / "artifacts"))


@pytest.fixture(scope="module")
def service(ray_cluster, s3_server) -> tuple[str, JobStore]:
    from ray import serve

    bucket = f"s3://studio-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket[len("s3://") :])
    yield deploy_on(bucket, "pusa-mini"), JobStore(f"{bucket}/serve")
    serve.delete("pusa")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "the page tests need Debian's browser: apt-get install chromium chromium-driver "
            "(`make test` installs them when it runs as root)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def until(browser, condition, timeout_s: float = 30.0, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout_s, poll_frequency=0.1).until(
        lambda driver: condition(driver), f"timed out after {timeout_s:.0f} s waiting for {what}"
    )


def css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, selector)


def text(browser, selector: str) -> str:
    return css(browser, selector).text


def visible(browser, selector: str) -> bool:
    return css(browser, selector).is_displayed()


def sign_in(browser, base: str, key: str = API_KEY) -> None:
    """Open the page; enter the key when it asks (once per browser session)."""
    browser.get(f"{base}/studio")
    until(browser, lambda b: visible(b, "#key-panel") or text(b, "#model-name").startswith("model "))
    if visible(browser, "#key-panel"):
        field = css(browser, "#key-input")
        field.clear()
        field.send_keys(key)
        css(browser, "#key-save").click()
    until(browser, lambda b: text(b, "#model-name") == "model pusa-mini", what="the model to load")


def page_errors(browser) -> list[str]:
    """The console's errors since the last call, but for the API's own 4xx answers (which the
    page shows): a script error or a blocked load (the page's Content-Security-Policy) is one."""
    entries = browser.get_log("browser")
    expected = re.compile(r"the server responded with a status of 4\d\d")
    return [e["message"] for e in entries if e["level"] == "SEVERE" and not expected.search(e["message"])]


def set_value(browser, selector: str, value: str) -> None:
    element = css(browser, selector)
    element.clear()
    if value:
        element.send_keys(value)


def choose_task(browser, task: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#task")).select_by_value(task)


def submit_and_wait(browser, timeout_s: float = 180.0) -> str:
    """Submit the form; wait until the player's job completed; its id."""
    css(browser, "#submit").click()
    until(browser, lambda b: visible(b, "#current") and text(b, "#current-id"), what="the job to be accepted")
    job_id = text(browser, "#current-id")
    until(
        browser,
        lambda b: css(b, "#current-status").get_attribute("data-status") in ("completed", "failed"),
        timeout_s,
        f"job {job_id} to finish",
    )
    assert css(browser, "#current-status").get_attribute("data-status") == "completed", text(
        browser, "#current-status"
    )
    return job_id


def test_the_page_asks_for_the_key_and_shows_the_401_of_a_wrong_one(service, browser) -> None:
    base, _store = service
    page = requests.get(f"{base}/studio", timeout=30)
    assert page.headers["content-type"].startswith("text/html") and "studio.js" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert requests.get(f"{base}/studio/secrets.txt", timeout=30).status_code == 404
    browser.get(f"{base}/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{base}/")  # `/` and `/studio` are the same page
    until(browser, lambda b: visible(b, "#key-panel"), what="the key panel")
    assert text(browser, "#model-name") == "API key needed"
    assert text(browser, "#key-error") == ""  # the first ask is not an error

    set_value(browser, "#key-input", "not-the-key")
    css(browser, "#key-save").click()
    until(browser, lambda b: "401" in text(b, "#key-error"), what="the 401")
    assert "missing or wrong API key" in text(browser, "#key-error")
    assert visible(browser, "#key-panel")

    set_value(browser, "#key-input", API_KEY)
    css(browser, "#key-save").click()
    until(browser, lambda b: text(b, "#model-name") == "model pusa-mini", what="the model to load")
    assert not visible(browser, "#key-panel")
    # the model's defaults and the service's limits come from GET /v1/models
    models = requests.get(
        f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ).json()
    assert css(browser, "#frames").get_attribute("placeholder") == str(models["defaults"]["frames"]) == "5"
    assert css(browser, "#steps").get_attribute("placeholder") == str(models["defaults"]["steps"])
    assert text(browser, '[data-field="frames"] .limit') == f"max {models['limits']['max_frames']}"
    # the key is kept for the session: a reload does not ask again
    browser.refresh()
    until(browser, lambda b: text(b, "#model-name") == "model pusa-mini", what="the model to load again")
    assert not visible(browser, "#key-panel")
    assert page_errors(browser) == []


def test_an_i2v_job_from_an_uploaded_image_plays_and_is_deleted_from_the_gallery(service, browser) -> None:
    base, store = service
    sign_in(browser, base)
    choose_task(browser, "i2v")
    assert visible(browser, '[data-field="image"]') and not visible(browser, '[data-field="video"]')
    set_value(browser, "#prompt", "a red circle moves right")
    css(browser, "#image").send_keys(str(EXAMPLE))
    preview = "return document.querySelector('[data-field=image] .preview').naturalWidth"
    until(browser, lambda b: b.execute_script(preview) > 0, what="the image preview")
    set_value(browser, "#steps", "6")

    progress_seen: list[str] = []
    css(browser, "#submit").click()
    until(browser, lambda b: text(b, "#current-id"), what="the job to be accepted")
    job_id = text(browser, "#current-id")

    def finished(b) -> bool:
        status, progress = b.execute_script(
            "return [document.getElementById('current-status').dataset.status,"
            " document.querySelector('.progress').getAttribute('aria-valuenow')]"
        )
        progress_seen.append(progress)
        return status in ("completed", "failed")

    until(browser, finished, 180.0, f"job {job_id} to finish")
    assert text(browser, "#current-status").startswith("completed"), text(browser, "#current-status")
    assert progress_seen[-1] == "100"
    assert [float(p) for p in progress_seen] == sorted(float(p) for p in progress_seen)  # never goes back

    # the result plays in the <video> element, fetched through the API with the key
    until(browser, lambda b: b.execute_script("return document.getElementById('result').readyState") >= 2,
          what="the video to load")  # fmt: skip
    duration = browser.execute_script("return document.getElementById('result').duration")
    assert duration == pytest.approx(5 / 4)  # pusa-mini: 5 frames at 4 fps
    link = css(browser, "#download-video")
    assert (
        link.get_attribute("href").startswith("blob:") and link.get_attribute("download") == f"{job_id}.mp4"
    )
    assert store.get_request(job_id)["task"] == "i2v" and store.get_request(job_id)["steps"] == 6

    # the gallery lists it with its first frame from the thumbnail variant of /content
    item = f'#gallery li[data-job="{job_id}"]'
    until(browser, lambda b: b.find_elements("css selector", f"{item} img") and b.execute_script(
        f"return document.querySelector('{item} img').naturalWidth") > 0, what="the thumbnail")  # fmt: skip
    assert "a red circle moves right" in text(browser, item)
    thumbnail = requests.get(
        f"{base}/v1/videos/{job_id}/content?variant=thumbnail",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert thumbnail.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (32, 32)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "studio.png"
    browser.save_screenshot(str(screenshot))
    shot = Image.open(screenshot)
    assert shot.size == tuple(browser.execute_script("return [window.innerWidth, window.innerHeight]"))
    assert screenshot.stat().st_size > 20_000  # a page with its form, player and gallery, not a blank
    assert len(shot.convert("RGB").getcolors(1 << 20) or ()) > 50

    assert page_errors(browser) == []
    css(browser, f"{item} button.delete").click()
    until(browser, lambda b: not b.find_elements("css selector", item), what="the job to leave the gallery")
    assert not visible(browser, "#current")
    response = requests.get(
        f"{base}/v1/videos/{job_id}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    assert response.status_code == 404


def test_a_bad_value_shows_the_apis_message_next_to_its_field(service, browser) -> None:
    base, _store = service
    sign_in(browser, base)
    listed = requests.get(
        f"{base}/v1/videos", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ).json()
    choose_task(browser, "t2v")
    set_value(browser, "#prompt", "a blue square moves left")
    set_value(browser, "#frames", "999")
    css(browser, "#submit").click()
    until(browser, lambda b: text(b, '[data-field="frames"] .field-error'), what="the frames error")
    assert text(browser, '[data-field="frames"] .field-error') == "frames: 999 exceeds the limit 33 (400)"
    assert "invalid" in css(browser, '[data-field="frames"]').get_attribute("class")
    assert text(browser, "#form-error") == ""

    set_value(browser, "#frames", "")
    set_value(browser, "#prompt", "   ")
    css(browser, "#submit").click()
    until(browser, lambda b: text(b, '[data-field="prompt"] .field-error'), what="the prompt error")
    assert text(browser, '[data-field="frames"] .field-error') == ""  # the old error is gone
    assert "prompt" in text(browser, '[data-field="prompt"] .field-error')
    after = requests.get(
        f"{base}/v1/videos", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ).json()
    assert [view["id"] for view in after["data"]] == [
        view["id"] for view in listed["data"]
    ]  # nothing submitted


def test_keyframes_placed_and_moved_on_the_timeline_reach_the_job(service, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    base, store = service
    sign_in(browser, base)
    choose_task(browser, "keyframes")
    set_value(browser, "#prompt", "a red circle moves right")
    set_value(browser, "#frames", "")
    timeline = css(browser, "#timeline")
    width = timeline.size["width"]

    def click_at(fraction: float) -> None:  # offsets are from the element's centre
        ActionChains(browser).move_to_element_with_offset(
            timeline, int((fraction - 0.5) * (width - 4)), 0
        ).click().perform()

    click_at(0.0)
    css(browser, "#kf-image").send_keys(str(EXAMPLE))
    click_at(1.0)

    def markers() -> list[str]:
        found = browser.find_elements("css selector", "#timeline .keyframe")
        return [marker.get_attribute("data-frame") for marker in found]

    until(browser, lambda b: markers() == ["0", "4"], what="two keyframes")
    # drag the last one a quarter of the way back: frame 4 -> 3
    last = browser.find_elements("css selector", "#timeline .keyframe")[1]
    ActionChains(browser).click_and_hold(last).move_by_offset(-width // 4, 0).release().perform()
    until(browser, lambda b: markers() == ["0", "3"], what="the keyframe to move")
    css(browser, "#kf-image").send_keys(
        str(REPO / "pusa_ray" / "mini" / "examples" / "red-circle-right-end.png")
    )
    set_value(browser, "#kf-noise", "0.3")
    css(browser, "#prompt").click()  # the change event of the noise field
    set_value(browser, "#steps", "4")
    job_id = submit_and_wait(browser)

    keyframes = store.get_request(job_id)["keyframes"]
    assert [(k["position"], k["noise"]) for k in keyframes] == [("f:0", 0.0), ("f:3", 0.3)]
    assert all(k["image"]["uri"] for k in keyframes)  # the uploaded images, stored with the job
    assert page_errors(browser) == []
