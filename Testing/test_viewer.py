"""The browser viewer end to end: `orthoknee serve` on a free localhost port, driven by Debian's
Chromium through its ChromeDriver (Selenium; no browser download), on a real prediction of
the shipped sample case.

Skipped, with the reason, where /usr/bin/chromium or /usr/bin/chromedriver is missing, unless
ORTHOKNEE_REQUIRE_BROWSER=1 (set by .ci/run, which installs both): then a missing browser fails.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO / "Resources" / "Screenshots"


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("ORTHOKNEE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    pytest.importorskip("selenium", reason="selenium is a test dependency")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def output_folder(tmp_path_factory) -> Path:
    from OrthoKneeLib.cli import main
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir

    _require_browser()
    out = tmp_path_factory.mktemp("viewer") / "out"
    series = [str(sample_case_dir() / name) for name in SAMPLE_VIEWS.values()]
    assert main(["predict", *series, "--out", str(out), "--device", "cpu", "--no-montage"]) == 0
    return out


def _serve(*args: str):
    """`orthoknee serve ARGS` on a free port, once it answers: (url, process, port)."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "OrthoKneeLib.cli", "serve", *args, "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"orthoknee serve exited: {process.stdout.read()[-2000:]}")
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("orthoknee serve did not answer within 90 s")
    return url, process, port


def _stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server(output_folder):
    url, process, port = _serve(str(output_folder))
    yield {"url": url, "process": process, "port": port}
    _stop(process)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _wait(predicate, timeout=60.0, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def page(server):
    browser = _browser()
    browser.get(server["url"])
    _wait(lambda: len(_rows(browser, ".finding-row")) == 8, what="8 finding rows")
    time.sleep(3)  # the first images of the four views, and the fit after layout
    yield browser
    browser.quit()


def _rows(browser, selector):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def _view_image(browser, index: int) -> np.ndarray:
    """Pixels of one of the four views (0 coronal, 1 sagittal, 2 3D, 3 axial) as the page shows them."""
    from PIL import Image

    area = _rows(browser, ".remote-controlled-area")[index]
    return np.asarray(Image.open(io.BytesIO(area.screenshot_as_png)).convert("RGB"), np.int16)


def _set_range(browser, element_id: str, value: float) -> None:
    browser.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        str(value),
    )


def _click(browser, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, element_id).click()


def test_the_page_lists_11_structures_and_8_findings_with_their_probabilities(page, output_folder):
    findings = json.loads((output_folder / "findings.json").read_text())["findings"]
    structures = [r.text for r in _rows(page, ".structure-name")]
    assert len(structures) == 11 and structures[0] == "Femur"
    shown = {}
    for row in _rows(page, ".finding-row"):
        key = row.get_attribute("id").removeprefix("finding-")
        shown[key] = (
            row.find_element("css selector", ".finding-probability").text,
            row.find_element("css selector", ".finding-where").text,
        )
    assert {k: p for k, (p, _) in shown.items()} == {k: f"{v['probability']:.3f}" for k, v in findings.items()}
    assert {k: w for k, (_, w) in shown.items()} == {k: v["where"] for k, v in findings.items()}
    if os.environ.get("ORTHOKNEE_SCREENSHOTS") == "1":  # refresh the README's screenshot on purpose only
        page.save_screenshot(str(SCREENSHOTS / "viewer.png"))


def test_toggling_the_overlay_changes_the_slice_image(page):
    _set_range(page, "threshold", 0.0)  # the whole map (this model's maps are faint), so that hiding it shows
    _set_range(page, "opacity", 1.0)
    _click(page, "show-collateral_ligament_injury")
    time.sleep(2.5)
    with_overlay = _view_image(page, 1)
    _click(page, "show-none")
    time.sleep(2.5)
    without = _view_image(page, 1)
    changed = np.mean(np.abs(with_overlay - without).sum(axis=-1) > 30)
    assert changed > 0.01, f"only {changed:.4f} of the sagittal view changed"
    _set_range(page, "threshold", 0.5)  # and the threshold slider acts: above 0.5 the map is nearly empty
    _click(page, "show-collateral_ligament_injury")
    time.sleep(2.5)
    high = _view_image(page, 1)
    assert np.mean(np.abs(high - without).sum(axis=-1) > 30) < changed / 2
    _set_range(page, "threshold", 0.5)
    _set_range(page, "opacity", 0.6)


def test_a_rejected_finding_and_a_paint_stroke_are_saved(page, output_folder):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    before = sitk.GetArrayFromImage(sitk.ReadImage(str(output_folder / "structures.seg.nrrd")))
    _click(page, "reject-joint_effusion")
    _wait(lambda: "rejected" in page.find_element(By.ID, "finding-joint_effusion").text, what="the decision")
    Select(page.find_element(By.ID, "paint-structure")).select_by_value("pcl")
    _click(page, "tool-paint")
    time.sleep(1.0)
    area = _rows(page, ".remote-controlled-area")[1]  # sagittal
    width, height = area.size["width"], area.size["height"]
    chain = ActionChains(page).move_to_element_with_offset(area, -width // 8, -height // 8).click_and_hold()
    for _ in range(12):
        chain = chain.move_by_offset(width // 60, height // 60).pause(0.05)
    chain.release().perform()
    time.sleep(2.0)
    _click(page, "tool-none")
    _click(page, "save")
    saved = _wait(
        lambda: "saved" in page.find_element(By.ID, "saved").text and page.find_element(By.ID, "saved").text,
        what="the save",
    )
    assert "structures-reviewed-1.seg.nrrd" in saved and "review-1.json" in saved
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(output_folder / "structures-reviewed-1.seg.nrrd")))
    pcl = 11
    assert int((after == pcl).sum()) > int((before == pcl).sum()), "the paint stroke added no PCL voxels"
    assert (output_folder / "structures.seg.nrrd").is_file()  # the prediction itself is kept
    review = json.loads((output_folder / "review-1.json").read_text())
    assert review["findings"]["joint_effusion"]["decision"] == "rejected"
    assert review["findings"]["acl_tear"]["decision"] is None
    _click(page, "save")  # a second save never replaces the first
    _wait(lambda: "review-2.json" in page.find_element(By.ID, "saved").text, what="the second save")
    assert json.loads((output_folder / "review-1.json").read_text()) == review


def test_the_server_survives_many_requests_a_dropped_client_and_two_tabs(page, server):
    for _ in range(50):  # sequential page requests
        with urllib.request.urlopen(server["url"], timeout=10) as response:
            assert response.status == 200
    for n in range(10):  # renders asked for in quick succession
        _set_range(page, "opacity", 0.3 + 0.05 * n)
    dropped = _browser()  # a client that goes away in the middle of a render
    dropped.get(server["url"])
    _wait(lambda: len(_rows(dropped, ".finding-row")) == 8, what="the second client's page")
    _set_range(dropped, "threshold", 0.2)
    dropped.quit()
    assert server["process"].poll() is None
    page.switch_to.new_window("tab")  # two tabs on the same case
    page.get(server["url"])
    _wait(lambda: len(_rows(page, ".finding-row")) == 8, what="the second tab's findings")
    first = page.window_handles[0]
    page.close()
    page.switch_to.window(first)
    _click(page, "show-cartilage_lesion")
    time.sleep(1.0)
    assert server["process"].poll() is None
    with urllib.request.urlopen(server["url"], timeout=10) as response:
        assert response.status == 200


def _listening_addresses(port: int) -> set[str]:
    """The local addresses the kernel has a listening TCP socket on for ``port`` (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_serve_binds_localhost_unless_told(server):
    assert _listening_addresses(server["port"]) == {"127.0.0.1"}


def test_serve_refuses_a_missing_path(tmp_path, capsys):
    from OrthoKneeLib.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _other_version(folder: Path) -> Path:
    """The shipped bundle as another version whose ACL-tear cells score 4 logits higher."""
    import shutil

    from OrthoKneeLib.bundle import Bundle
    from OrthoKneeLib.resources import demo_bundle_dir

    shutil.copytree(demo_bundle_dir(), folder)
    bundle = Bundle.open(folder)
    weights = bundle.load_state(bundle.metadata["heads"]["weights"], "heads")
    weights["findings.cell_logits.bias"][0] += 4.0  # acl_tear, the catalog's first finding
    bundle.metadata["heads"]["sha256"] = bundle.save_weights(bundle.metadata["heads"]["weights"], weights)
    bundle.metadata["version"] = "9.9.9"
    bundle.save_metadata()
    return folder


def test_another_version_runs_on_the_case_and_is_compared(output_folder, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    other = _other_version(tmp_path / "other-version")
    url, process, _ = _serve(str(output_folder), "--versions", str(other), "--device", "cpu")
    browser = _browser()
    try:
        browser.get(url)
        _wait(lambda: len(_rows(browser, ".finding-row")) == 8, what="8 finding rows")
        options = [o.text for o in Select(browser.find_element(By.ID, "version")).options]
        assert any("9.9.9" in o for o in options) and any("0.10.0" in o or "0.11.0" in o for o in options)
        Select(browser.find_element(By.ID, "version")).select_by_value(str(other.resolve()))
        _click(browser, "run-version")
        _wait(lambda: len(_rows(browser, ".compare-row")) == 11, timeout=240, what="the comparison")
        dice = [r.find_element(By.CSS_SELECTOR, ".compare-dice").text for r in _rows(browser, ".compare-row")]
        # the segmentation head is the same: the structures agree up to the paint strokes saved into A
        agree = [d for d in dice if d == "-" or float(d) >= 0.98]
        assert len(agree) >= 10 and (len(agree) == 11) == (not list(output_folder.glob("*reviewed*"))), dice
        assert "acl_tear" in browser.find_element(By.ID, "compare-findings").text
        compared = next(output_folder.parent.glob(f"{output_folder.name}--*9.9.9"))
        b = json.loads((compared / "findings.json").read_text())["findings"]["acl_tear"]["probability"]
        a = json.loads((output_folder / "findings.json").read_text())["findings"]["acl_tear"]["probability"]
        assert b > a
        _click(browser, "show-b")
        _wait(lambda: "9.9.9" in browser.find_element(By.ID, "case-title").text, what="version B on the page")
        shown = {
            r.get_attribute("id").removeprefix("finding-"): r.find_element(By.CSS_SELECTOR, ".finding-probability").text
            for r in _rows(browser, ".finding-row")
        }
        assert shown["acl_tear"] == f"{b:.3f}"
        if os.environ.get("ORTHOKNEE_SCREENSHOTS") == "1":
            browser.save_screenshot(str(SCREENSHOTS / "viewer-versions.png"))
        assert process.poll() is None
    finally:
        browser.quit()
        _stop(process)
