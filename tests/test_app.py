"""The Gradio demo (examples/app.py) served on 127.0.0.1 and driven two ways: through gradio's Python client (the
API) and in a real headless Chromium (Debian's chromium and chromium-driver, through selenium), which uploads an
image, types an expression, submits and reads the mask the page shows. Both masks must equal predict.py's for
the same image and expression; oversize images and empty expressions are refused with a message in the page.

The model is the shipped tiny CLIP with a seeded decoder, exported with its threshold at the median
probability of the test image, so that the mask is half the image and a wrong one cannot pass by accident.

``MASKSD_APP_SCREENSHOT=docs/app.png`` (with ``MASKSD_APP_MODEL=runs/demo/export`` for a trained model) also
writes the browser's screenshot there: the README's picture of the page."""

from __future__ import annotations

import io
import os
import shutil
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio = pytest.importorskip("gradio")
pytest.importorskip("huggingface_hub")

from examples.app import SHIPPED, build_app, load_model, segment_request, synthetic_scene  # noqa: E402
from tests.test_refer import png_claiming  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRED = os.environ.get("MASKSD_REQUIRE_BROWSER") == "1"
"""Set by .ci/run, which installs chromium: there the browser test fails rather than skips."""
TEXT = "the blue circle"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, the image file, the export folder the page serves, the page's own model)."""
    from examples.pipeline.export import SegmenterExport, export_config, save_export
    from examples.pipeline.inference import segment

    folder = tmp_path_factory.mktemp("app")
    shipped = load_model(os.environ.get("MASKSD_APP_MODEL", SHIPPED))
    image, text = synthetic_scene(shipped, folder, index=3)
    assert text == TEXT
    from masksd.data import read_rgb

    probability = segment(shipped.segmenter, read_rgb(image), TEXT, shipped.run.resize, shipped.run.restore).probability
    threshold = float(np.median(probability)) if not shipped.trained else shipped.run.eval_threshold
    run = replace(shipped.run, eval_threshold=threshold)
    export = save_export(SegmenterExport(shipped.segmenter, export_config(shipped.segmenter, asdict(run), 0, None)), folder / "export")
    model = load_model(str(export))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        env.setenv("NO_PROXY", "127.0.0.1,localhost")  # the client and the browser talk to 127.0.0.1, never through a proxy
        app = build_app(model)
        _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, max_file_size="50mb")
        try:
            yield url.rstrip("/"), Path(image), export, model
        finally:
            app.close()


@pytest.fixture(scope="module")
def expected(served, tmp_path_factory):
    """predict.py's mask for the test image and expression, from the same export folder."""
    from examples.predict import main as predict_main

    _, image, export, model = served
    mask_path, _ = predict_main(["--checkpoint", str(export), "--image", str(image), "--text", TEXT, "--threshold",
                                 str(model.run.eval_threshold), "--output-dir", str(tmp_path_factory.mktemp("predicted"))])
    mask = np.asarray(Image.open(mask_path))
    if "MASKSD_APP_MODEL" not in os.environ:  # the seeded model at its median: half the image
        assert 0.2 < (mask > 0).mean() < 0.8  # a mask that a wrong pipeline would not reproduce by chance
    return mask


def test_the_handler_refuses_what_it_cannot_segment(served, tmp_path):
    _, image, _, model = served
    assert segment_request(model, str(image), "   ")[-1].startswith("**Refused:** the referring expression is empty")
    assert segment_request(model, None, TEXT)[-1].startswith("**Refused:** upload an image")
    bomb = tmp_path / "bomb.png"
    png_claiming(bomb, 10_000, 9_000)
    status = segment_request(model, str(bomb), TEXT)[-1]
    assert "the uploaded image is refused: 10000x9000 = 90,000,000 pixels, over masksd.data.images.MAX_IMAGE_PIXELS" in status
    assert str(bomb) not in status


def test_the_api_returns_the_models_own_mask_and_refuses_with_a_message(served, expected, tmp_path):
    from gradio_client import Client, handle_file

    url, image, _, _ = served
    client = Client(url, verbose=False, download_files=str(tmp_path))
    overlay, mask, correlation, patches, words, status = client.predict(handle_file(str(image)), TEXT, api_name="/segment")
    assert np.array_equal(np.asarray(Image.open(mask)), expected)
    assert Image.open(overlay).size == Image.open(correlation).size == Image.open(patches).size == (256, 256)  # 64 px, shown 4x
    tokens = [(item["token"].strip(), item["class_or_confidence"]) for item in words]
    assert [t for t, _ in tokens] == ["<start_of_text>", "the", "blue", "circle", "<end_of_text>"]
    assert sum(c == "masked" for _, c in tokens) == 1 and tokens[0][1] is None and tokens[-1][1] is None  # VMLSD: one real word
    assert f"{int((expected > 0).sum()):,} of 4,096 pixels" in status and " ms on cpu" in status

    *panels, status = client.predict(handle_file(str(image)), "", api_name="/segment")
    assert panels == [None] * 5 and status.startswith("**Refused:** the referring expression is empty")


@pytest.mark.skipif((CHROMIUM is None or CHROMEDRIVER is None) and not REQUIRED,
                    reason="no chromium/chromedriver on PATH: apt-get install chromium chromium-driver (.ci/run installs them)")
def test_a_real_browser_uploads_types_submits_and_gets_the_models_mask(served, expected, tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "MASKSD_REQUIRE_BROWSER=1 (CI) but chromium or chromedriver is missing"
    if not REQUIRED:
        pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, image, _, _ = served
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1100",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(url)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(image))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))  # the preview: the upload is done
        box = driver.find_element(By.CSS_SELECTOR, "#text textarea")
        box.send_keys(TEXT)
        driver.find_element(By.ID, "segment").click()
        wait.until(lambda d: "pixels" in d.find_element(By.ID, "status").text)
        source = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#mask img").get_attribute("src"))
        shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(source, timeout=30).read())))
        assert np.array_equal(shown, expected)  # the page shows predict.py's mask for this image and expression
        status = driver.find_element(By.ID, "status").text
        assert f"{int((expected > 0).sum()):,} of 4,096 pixels for the blue circle" in status
        highlighted = driver.find_element(By.ID, "words").text
        assert "blue" in highlighted and "circle" in highlighted
        for panel in ("overlay", "correlation", "patches"):
            assert driver.find_element(By.CSS_SELECTOR, f"#{panel} img").get_attribute("src")
        screenshot = tmp_path / "app.png"
        driver.save_screenshot(str(screenshot))
        assert Image.open(screenshot).size[0] >= 1000
        if os.environ.get("MASKSD_APP_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["MASKSD_APP_SCREENSHOT"])

        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)  # as a person does: clear() sets the value without the input event the page listens to
        driver.find_element(By.ID, "segment").click()
        wait.until(lambda d: "Refused" in d.find_element(By.ID, "status").text)
        assert "the referring expression is empty" in driver.find_element(By.ID, "status").text

        bomb = tmp_path / "bomb.png"
        png_claiming(bomb, 10_000, 9_000)
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(bomb))
        box.send_keys(TEXT)
        driver.find_element(By.ID, "segment").click()
        wait.until(lambda d: "MAX_IMAGE_PIXELS" in d.find_element(By.ID, "status").text)
        assert "10000x9000 = 90,000,000 pixels" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


def test_the_script_serves_this_machine_only_unless_told_and_names_a_missing_extra(monkeypatch, served):
    import PIL.Image

    import examples.app as app_script

    launched = {}
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", PIL.Image.MAX_IMAGE_PIXELS)  # main() hands the limit to read_rgb
    _, _, export, _ = served
    app_script.main(["--model", str(export), "--port", "7999"])
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999 and launched["max_file_size"] == "50mb"
    app_script.main(["--model", str(export), "--host", "0.0.0.0"])
    assert launched["server_name"] == "0.0.0.0"
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)
    with pytest.raises(ImportError, match=r"the demo needs gradio: pip install 'masksd\[app\]'"):
        app_script.main([])
