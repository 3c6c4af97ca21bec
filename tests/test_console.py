"""The web console (/ui/) in a real browser: headless Chromium from Debian driven by Selenium, against
`scdd serve` on loopback (its own redis-server; the session's Ray head) running real Fashion-MNIST jobs.

Screenshots of each page go to SCDD_SCREENSHOTS (default: .screenshots/console/ in the repository; not
committed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from service.serve import child_env
from tests.services import free_port, stop_service_ray_jobs, wait_until
from tests.test_data import make_imagefolder
from tests.test_service_artifacts import fabricate_job

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("SCDD_SCREENSHOTS", ROOT / ".screenshots" / "console"))
EVIL = "<img src=x onerror=alert(1)>"
FINAL = {"succeeded", "failed", "cancelled"}
QUICK = {"device": "cpu", "amp": "off", "channels_last": "off", "compile": "off"}


def chromium(downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("headless Chromium is missing: apt-get install chromium chromium-driver (scripts/setup.sh does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1100", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers on the network
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return browser


@pytest.fixture
def serve(tmp_path, ray_head):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = child_env(SCDD_API_KEYS="acme=key-acme,globex=key-globex", RAY_ADDRESS=ray_head.jobs_url,
                    SCDD_DATA_ROOTS=os.pathsep.join(["/usr/share/datasets", str(tmp_path)]), SCDD_POLL_S="0.3",
                    SCDD_SUBMIT_BURST="60")  # the paging check submits 25 jobs at once
    for name in ("REDIS_URL", "SCDD_API_KEYS_FILE", "SCDD_ARTIFACTS"):
        env.pop(name, None)
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "scdd_cli", "serve", "--port", str(port), "--max-running", "2",
                                "--data-dir", str(tmp_path / "service")], env=env, stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    since_ms = int(time.time() * 1000)
    wait_until(up, 120, "scdd serve")
    yield url
    process.terminate()
    process.wait(120)
    stop_service_ray_jobs(ray_head.jobs_url, since_ms)  # drivers whose Redis just went with `serve`


def api(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def big_finished_job(url: str) -> str:
    """A job of acme's with the artifacts of a 1000-class IPC-5 run: a job submitted and cancelled at once (its
    driver, had one started, long gone), then its folder made as scdd writes it (tests/test_service_artifacts)."""
    with api(url, "key-acme") as acme:
        job = acme.post("/v1/jobs", json={"dataset": {"classes": [0, 1]}, "resources": QUICK}).json()
        acme.post(f"/v1/jobs/{job['id']}/cancel")
        wait_until(lambda: acme.get(f"/v1/jobs/{job['id']}").json()["state"] in FINAL, 60, "the cancel")
    folder = Path(job["spec"]["output"]["url"])
    shutil.rmtree(folder, ignore_errors=True)
    fabricate_job(folder, classes=1000, ipc=5)
    return job["id"]


def test_the_console_signs_in_submits_follows_shows_and_cancels_jobs_of_one_tenant(serve, tmp_path, fmnist_root):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def waiting(seconds: float, poll: float = 0.1) -> WebDriverWait:
        """A wait that tries again when the page is re-rendered under it (hash routes replace the content)."""
        return WebDriverWait(browser, seconds, poll_frequency=poll,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = httpx.get(f"{serve}/ui/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert httpx.get(f"{serve}/ui/static/console.js").headers["content-security-policy"]

    # jobs made through the API: acme's on an ImageFolder with a hostile class name, and one of globex's
    data = make_imagefolder(tmp_path / "evil", classes=(EVIL, "plain"), per_class=6, size=(16, 16))
    with api(serve, "key-acme") as acme, api(serve, "key-globex") as globex:
        evil = acme.post("/v1/jobs", json={
            "method": "sre2l", "dataset": {"name": "imagefolder", "root": str(data), "image_size": 16},
            "teacher": {"epochs": 1}, "recover": {"ipc": 1, "iterations": 3, "batch_size": 2},
            "validate": {"enabled": False}, "resources": QUICK}).json()["id"]
        theirs = globex.post("/v1/jobs", json={"dataset": {"classes": [0, 1]}, "resources": QUICK}).json()["id"]
        assert globex.post(f"/v1/jobs/{theirs}/cancel").status_code == 202

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = chromium(downloads)
    wait = waiting(60)

    def shot(name: str) -> None:
        browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))

    def text(css: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, css).text

    try:
        browser.get(f"{serve}/ui/")
        # a wrong key is refused
        wait.until(lambda b: b.find_element(By.ID, "api-key"))
        shot("sign-in")
        browser.find_element(By.ID, "api-key").send_keys("not-a-key")
        browser.find_element(By.ID, "sign-in").click()
        wait.until(lambda b: "refused" in text("#signin-error"))
        assert browser.execute_script("return sessionStorage.getItem('scdd.apiKey')") is None
        # the right one: the jobs page lists acme's job, not globex's
        key_input = browser.find_element(By.ID, "api-key")
        key_input.clear()
        key_input.send_keys("key-acme")
        browser.find_element(By.ID, "sign-in").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f'tr[data-job="{evil}"]'))
        assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{theirs}"]')
        assert "key-acme" not in browser.current_url
        shot("jobs")
        browser.get(f"{serve}/ui/#/jobs/{theirs}")  # globex's job by its id: as absent as a job that never was
        wait.until(lambda b: text("h1") == f"Job {theirs}" and b.find_elements(By.CSS_SELECTOR, "p.error"))
        assert f"no job '{theirs}'" in text("p.error")

        # submit from the form: first a value the server refuses (its message beside the field), then a good one
        browser.get(f"{serve}/ui/#/submit")
        wait.until(lambda b: b.find_elements(By.ID, "f-recover.ipc"))
        shot("submit")

        def fill(field: str, value: str) -> None:
            element = browser.find_element(By.ID, f"f-{field}")
            if element.tag_name == "select":
                Select(element).select_by_value(value)
            else:
                element.clear()
                element.send_keys(value)

        assert browser.find_element(By.ID, "f-recover.ipc").get_attribute("value") == "10"  # the default
        for field, value in {"method": "sre2l", "dataset.root": str(fmnist_root), "dataset.classes": "0, 1",
                             "dataset.train_limit": "100", "dataset.test_limit": "20", "teacher.epochs": "2",
                             "recover.ipc": "0", "recover.iterations": "100", "recover.batch_size": "2",
                             "validate.enabled": "false", "resources.device": "cpu", "resources.amp": "off",
                             "resources.channels_last": "off", "resources.compile": "off"}.items():
            fill(field, value)
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: text("#f-recover\\.ipc-error"))
        assert "greater than or equal to 1" in text("#f-recover\\.ipc-error")
        fill("recover.ipc", "3")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: "#/jobs/j-" in b.current_url)
        mine = browser.current_url.rsplit("/", 1)[1]
        wait.until(lambda b: text("h1") == f"Job {mine}")

        # its page: progress and a curve that grow without a reload, then the report and the grid
        seen_points: list[int] = []
        seen_progress: set[float] = set()

        def progressing(b) -> bool:
            points = [int(c.get_attribute("data-points")) for c in b.find_elements(By.CSS_SELECTOR, ".chart")]
            if points and (not seen_points or max(points) != seen_points[-1]):
                seen_points.append(max(points))
            seen_progress.add(float(b.find_element(By.ID, "job-progress").get_attribute("data-fraction")))
            return text("#job-state") in FINAL

        waiting(240, 0.05).until(progressing)
        assert text("#job-state") == "succeeded", text("#job-error")
        assert len(seen_points) >= 2 and seen_points == sorted(seen_points), seen_points  # it grew while shown
        assert len([f for f in seen_progress if 0 < f < 1]) >= 2, sorted(seen_progress)
        stages = {e.get_attribute("id") for e in browser.find_elements(By.CSS_SELECTOR, "#stages .bar.done")}
        assert {"stage-squeeze", "stage-recover"} <= stages
        wait.until(lambda b: b.find_elements(By.ID, "grid") and b.find_element(By.ID, "grid").get_property("naturalWidth"))
        assert "teacher top-1" in text("#report")
        buttons = browser.find_elements(By.CSS_SELECTOR, ".class-button")
        assert len(buttons) == 2
        buttons[0].click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#class-images img")) == 3)
        assert all(img.get_property("naturalWidth") > 0
                   for img in browser.find_elements(By.CSS_SELECTOR, "#class-images img"))
        shot("job")
        browser.find_element(By.ID, "download").click()  # the whole set as one zip, saved from a signed link
        archive = downloads / f"{mine}.zip"
        wait_until(lambda: archive.exists() and zipfile.is_zipfile(archive), 30, "the zip download")
        names = zipfile.ZipFile(archive).namelist()
        assert f"{mine}/report.json" in names and len([n for n in names if n.endswith(".png")]) == 7  # 6 + grid
        spec = yaml.safe_load(text("#spec-yaml"))  # what "Copy as YAML" copies: a spec the service accepts
        assert spec["recover"]["ipc"] == 3 and "url" not in spec.get("output", {})
        with api(serve, "key-acme") as acme:
            again = acme.post("/v1/jobs", json=spec)
            assert again.status_code == 202, again.text
            acme.post(f"/v1/jobs/{again.json()['id']}/cancel")

        # a 1000-class job: the page lists the class folders only, a class's images come when it is opened (not
        # grid.png, not the other 999 classes), and Download all saves the zip from a link, not a fetched blob
        big = big_finished_job(serve)
        fetched = "return performance.getEntriesByType('resource').filter(e => e.initiatorType === 'fetch')" \
                  ".map(e => e.name)"
        browser.execute_script("performance.setResourceTimingBufferSize(10000); performance.clearResourceTimings()")
        browser.get(f"{serve}/ui/#/jobs/{big}")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".class-button")) == 1000)
        listings = [url for url in browser.execute_script(fetched) if "/artifacts?" in url]
        assert listings and all("delimiter=%2F" in url for url in listings), listings  # never the 5000 images
        browser.execute_script("performance.clearResourceTimings()")
        browser.find_element(By.CSS_SELECTOR, '.class-button[data-class="n00000777"]').click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#class-images img")) == 5)
        assert all(img.get_property("naturalWidth") > 0
                   for img in browser.find_elements(By.CSS_SELECTOR, "#class-images img"))
        urls = browser.execute_script(fetched)
        assert not [url for url in urls if "grid.png" in url], urls
        assert sorted(url.split(f"/v1/jobs/{big}/")[1] for url in urls if f"/v1/jobs/{big}/artifacts" in url) == [
            "artifacts/images/n00000777/777_0000.png", "artifacts/images/n00000777/777_0001.png",
            "artifacts/images/n00000777/777_0002.png", "artifacts/images/n00000777/777_0003.png",
            "artifacts/images/n00000777/777_0004.png", "artifacts?prefix=images%2Fn00000777%2F&limit=5000"]
        browser.execute_script("performance.clearResourceTimings()")
        browser.find_element(By.ID, "download").click()
        big_zip = downloads / f"{big}.zip"
        wait_until(lambda: big_zip.exists() and zipfile.is_zipfile(big_zip), 30, "the 1000-class zip download")
        assert len(zipfile.ZipFile(big_zip).namelist()) == 5000 + 4  # images, manifest, report, grid, teacher
        assert [url.split(f"/v1/jobs/{big}/")[1] for url in browser.execute_script(fetched) if "/archive" in url] == [
            "archive-link"]  # the zip itself was the browser's download, not a fetch()
        shot("job-1000-classes")

        # the hostile class name is text, and no script ran
        browser.get(f"{serve}/ui/#/jobs/{evil}")  # a new hash, not a new page: wait for this job's buttons
        wait.until(lambda b: EVIL in [e.text for e in b.find_elements(By.CSS_SELECTOR, ".class-button")])
        browser.execute_script("window.__alerts = 0; window.alert = () => { window.__alerts += 1; };")
        # a finished job's curves come from GET .../curves, and the replayed events add no point twice
        with api(serve, "key-acme") as acme:
            curves = acme.get(f"/v1/jobs/{evil}/curves").json()["curves"]
        drawn = {f"{c['stage']}/{c['loop']}": len(c["points"]) for c in curves
                 if any(m in p["values"] for p in c["points"] for m in ("ce", "bn", "loss"))}

        def charts(b) -> dict[str, int]:
            return {c.get_attribute("data-curve"): int(c.get_attribute("data-points"))
                    for c in b.find_elements(By.CSS_SELECTOR, ".chart")}

        assert drawn, curves
        wait.until(lambda b: charts(b) == drawn)
        time.sleep(0.5)  # the event stream's replay has come and gone
        assert charts(browser) == drawn
        browser.find_element(By.CSS_SELECTOR, f'.class-button[data-class="{EVIL}"]').click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#class-images img"))
        assert text("#class-title").startswith(f"Class {EVIL}")
        assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
        assert browser.execute_script("return window.__alerts") == 0

        # cancel a second job from its page
        with api(serve, "key-acme") as acme:
            second = acme.post("/v1/jobs", json={**spec, "recover": {**spec["recover"], "iterations": 5000}}).json()["id"]
        browser.get(f"{serve}/ui/#/jobs/{second}")
        wait.until(lambda b: text("h1") == f"Job {second}" and b.find_element(By.ID, "cancel").is_enabled())
        browser.find_element(By.ID, "cancel").click()
        waiting(120, 0.2).until(lambda b: text("#job-state") == "cancelled")
        browser.find_element(By.ID, "resume").click()  # its next attempt, on its own output; the page follows it
        wait.until(lambda b: "(attempt 2)" in text("#job-stage") and text("#job-state") not in FINAL)
        assert not browser.find_element(By.ID, "resume").is_displayed()
        with api(serve, "key-acme") as acme:
            acme.post(f"/v1/jobs/{second}/cancel")
        waiting(120, 0.2).until(lambda b: text("#job-state") == "cancelled")

        # the jobs page: filter by state, page with the cursor (25 more cancelled jobs: two pages of 20)
        with api(serve, "key-acme") as acme:
            for _ in range(25):
                acme.post(f"/v1/jobs/{acme.post('/v1/jobs', json=spec).json()['id']}/cancel")
        browser.get(f"{serve}/ui/#/jobs")
        wait.until(lambda b: text("h1") == "Jobs" and b.find_elements(By.CSS_SELECTOR, "#jobs-body tr[data-job]"))
        Select(browser.find_element(By.ID, "state-filter")).select_by_value("cancelled")

        def states() -> list[str]:
            return [row.find_element(By.CSS_SELECTOR, "td.state").text
                    for row in browser.find_elements(By.CSS_SELECTOR, "#jobs-body tr[data-job]")]

        wait.until(lambda b: len(states()) == 20 and set(states()) == {"cancelled"})
        first_page = [r.get_attribute("data-job") for r in browser.find_elements(By.CSS_SELECTOR, "#jobs-body tr[data-job]")]
        assert browser.find_element(By.ID, "older").is_enabled() and not browser.find_element(By.ID, "newer").is_enabled()
        browser.find_element(By.ID, "older").click()
        wait.until(lambda b: 0 < len(states()) < 20 and set(states()) == {"cancelled"})
        second_page = [r.get_attribute("data-job") for r in browser.find_elements(By.CSS_SELECTOR, "#jobs-body tr[data-job]")]
        assert not set(first_page) & set(second_page) and max(second_page) < min(first_page)  # older, none twice
        assert second in second_page or second in first_page
        browser.find_element(By.ID, "newer").click()
        wait.until(lambda b: len(states()) == 20)

        # sign out: the key is gone and the jobs page asks for it again
        browser.find_element(By.ID, "sign-out").click()
        wait.until(lambda b: b.find_elements(By.ID, "api-key"))
        assert browser.execute_script("return sessionStorage.getItem('scdd.apiKey')") is None
        browser.get(f"{serve}/ui/#/jobs")
        wait.until(lambda b: b.find_elements(By.ID, "api-key"))
        csp_errors = [entry for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]
        assert not csp_errors, csp_errors
    except Exception:
        shot("failure")
        raise
    finally:
        browser.quit()


def test_every_console_file_is_package_data_so_the_wheel_and_image_carry_it():
    import fnmatch
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "service.api.console"]
    package = ROOT / "service" / "api" / "console"
    served = [p.relative_to(package).as_posix() for p in (package / "static").rglob("*")
              if p.is_file() and p.name != "README.md"]
    assert served and all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in served), served
