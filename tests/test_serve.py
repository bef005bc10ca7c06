"""The web app: its handlers against the inference functions, and a real headless-Chromium session.

The browser test starts the server (``maskloop serve``'s :func:`maskloop.serve.serve`) on 127.0.0.1, uploads an image, types an expression,
waits for the overlay and checks the mask PNG the page received equals ``maskloop segment
--mask-out`` on the same inputs; it writes a screenshot in its tmp dir. It skips, saying why,
when gradio, selenium, chromium or chromedriver is missing (``.ci/run`` installs them).
"""

import io
import shutil
import time
import urllib.request

import numpy as np
import pytest
from conftest import export_tiny_with_shape, free_port
from PIL import Image


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random tiny model exported as a checkpoint folder, a shapes image and its object mask."""
    return export_tiny_with_shape(tmp_path_factory.mktemp("serve"))


def test_handlers_match_inference_and_the_cycle_iou(served):
    from maskloop.inference import caption_region, load_model, read_image, segment_text
    from maskloop.serve import cycle, editor_mask, segment_expressions, split_expressions

    model = load_model(served / "ckpt")
    img = read_image(served / "img.png")
    assert split_expressions("the circle; the square\n\n the red one ") == ["the circle", "the square", "the red one"]
    pairs = segment_expressions(model, img, "the circle\nthe square")
    assert [e for e, _ in pairs] == ["the circle", "the square"]
    for e, m in pairs:  # several expressions: one mask each, each what `segment` gives
        assert np.array_equal(m, segment_text(model, img, e)[0])
    gt = np.asarray(Image.open(served / "mask.png")) > 127
    # a drawn region (the editor's RGBA layer) and an uploaded mask give the same region
    layer = np.zeros((*gt.shape, 4), np.uint8)
    layer[gt] = (255, 40, 200, 255)
    editor = {"background": np.asarray(img), "layers": [layer], "composite": None}
    assert np.array_equal(editor_mask(editor)[1], gt)
    assert np.array_equal(editor_mask(editor, np.asarray(Image.open(served / "mask.png")))[1], gt)
    with pytest.raises(ValueError, match="draw the region"):
        editor_mask({"background": np.asarray(img), "layers": []})
    generated = caption_region(model, img, gt)[0].strip()
    if generated:  # the cycle on the model's own caption
        assert cycle(model, img, gt)[0] == generated
    else:  # (a random tiny model may say nothing: one clear error)
        with pytest.raises(ValueError, match="caption of this region is empty"):
            cycle(model, img, gt)
    text, m2, score = cycle(model, img, gt, caption="the circle")  # an edited caption
    assert text == "the circle"
    ref = segment_text(model, img, text)[0]
    assert np.array_equal(m2, ref)
    inter, union = np.logical_and(gt, ref).sum(), np.logical_or(gt, ref).sum()
    assert score == pytest.approx(inter / union)


def _browser_or_skip():
    missing = []
    for mod in ("gradio", "selenium"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(f"python package {mod}")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium:
        missing.append("chromium")
    if not driver:
        missing.append("chromedriver")
    if missing:
        reason = "browser test skipped: missing " + ", ".join(missing) + " (.ci/run installs them)"
        print(reason)
        pytest.skip(reason)
    return chromium, driver


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")  # pandas, inside gradio's queue
def test_browser_upload_expression_overlay_and_mask_equals_segment(served, tmp_path):
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from maskloop.cli import main

    start = time.monotonic()
    expr = "the circle"
    assert main(["segment", "-c", str(served / "ckpt"), "--image", str(served / "img.png"), "--text", expr,
                 "--out", str(tmp_path / "cli_overlay.png"), "--mask-out", str(tmp_path / "cli_mask.png")]) == 0
    want = np.asarray(Image.open(tmp_path / "cli_mask.png")) > 127

    from maskloop.serve import serve

    port = free_port()
    # in this process (its imports are paid already): `maskloop serve` is this call plus argument parsing
    app = serve(served / "ckpt", host="127.0.0.1", port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    driver = None
    try:
        urllib.request.urlopen(url, timeout=10).read(100)
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--window-size=1400,1100"):
            opts.add_argument(a)
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        driver.set_page_load_timeout(30)
        driver.get(url)
        wait = WebDriverWait(driver, 20)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#seg_image input[type=file]")))
        upload.send_keys(str(served / "img.png"))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#seg_image img")))
        box = driver.find_element(By.CSS_SELECTOR, "#seg_text textarea")
        box.send_keys(expr)
        driver.find_element(By.CSS_SELECTOR, "#seg_button").click()
        mask_img = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#seg_masks img")))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#seg_overlay img")) >= 2)  # image + mask layer
        info = driver.find_element(By.CSS_SELECTOR, "#seg_info textarea").get_attribute("value")
        src = mask_img.get_attribute("src")
        time.sleep(0.5)  # let the overlay paint before the screenshot
        driver.save_screenshot(str(tmp_path / "serve_segment.png"))
        print(f"screenshot: {tmp_path / 'serve_segment.png'}")
        got = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=10).read())).convert("L")) > 127
        # the cycle tab: image + uploaded region mask, a typed caption, one click -> IoU shown
        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'cycle')]").click()
        ed = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#cap_editor input[type=file]")))
        ed.send_keys(str(served / "img.png"))
        mk = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#cap_mask input[type=file]")))
        mk.send_keys(str(served / "mask.png"))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#cap_mask img")))
        driver.find_element(By.CSS_SELECTOR, "#cap_text textarea").send_keys(expr)
        iou_box = driver.find_element(By.CSS_SELECTOR, "#cycle_iou textarea")
        for attempt in range(2):  # a click racing the editor's upload is answered "upload an image": click again
            driver.find_element(By.CSS_SELECTOR, "#cycle_button").click()
            try:
                WebDriverWait(driver, 15).until(lambda d: iou_box.get_attribute("value"))
                break
            except Exception:
                if attempt:
                    driver.save_screenshot(str(tmp_path / "serve_cycle.png"))
                    raise
        driver.save_screenshot(str(tmp_path / "serve_cycle.png"))
        shown_iou = iou_box.get_attribute("value")
    finally:
        if driver is not None:
            driver.quit()
        app.close()
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"{(got != want).sum()} pixels differ"
    assert f"{expr}: {int(want.sum())} px" in info
    assert (tmp_path / "serve_segment.png").stat().st_size > 10_000
    gt = np.asarray(Image.open(served / "mask.png")) > 127
    assert shown_iou == f"{np.logical_and(gt, want).sum() / np.logical_or(gt, want).sum():.3f}"
    print(f"browser test: {time.monotonic() - start:.1f} s, mask {int(want.sum())} of {want.size} px")


def test_serve_verb_errors_are_one_line(tmp_path, capsys):
    from maskloop.cli import build_parser, main

    args = build_parser().parse_args(["serve", "-c", "runs/x", "--port", "7999"])
    assert (args.port, args.host) == (7999, "127.0.0.1")
    assert main(["serve", "-c", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and ("nope" in err or "gradio" in err)
