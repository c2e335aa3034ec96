"""report.html and index.html, opened in a real headless Chromium (Selenium, the system chromedriver).

One conversion (module-scoped) of a shallow vit_fmnist on a directory of Fashion-MNIST images, fine-tuned and
quantized, profiled and given a sensitivity map, so every rung, chart and section is there; one two-job batch
with ``profile_runs: 0`` for index.html. ``make test`` installs chromium and chromium-driver (Debian) when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vitcompress
from tests.conftest import FAST
from vitcompress.cli import main
from vitcompress.data import FMNIST_CLASSES, load_fmnist_arrays
from vitcompress.ladder import RUNGS
from vitcompress.sensitivity_map import sensitivity

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INJECTED = '<script>window.injected = 1</script><img src="x" onerror="window.injected = 2">'
#: Fine-tuned and quantized, profiled: every rung is measured and every chart drawn.
CONVERT = [*FAST, "finetune.steps=4", "finetune.lr=1e-3", "export.quantize=dynamic", "validate.profile_runs=3",
           "validate.holdout_fraction=0.5", "validate.images=null", "validate.min_agreement=null",
           "validate.max_top1_drop=null"]


def image_directory(root: Path, per_class: int = 6) -> Path:
    """Real Fashion-MNIST test images as PNGs in one folder per class (named as the model's classes)."""
    images, labels = load_fmnist_arrays("test")
    for c, name in enumerate(FMNIST_CLASSES):
        folder = root / name.replace("/", "_")
        folder.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels.numpy() == c)[:per_class]):
            Image.fromarray(images[i, 0].numpy()).save(folder / f"{j}.png")
    return root


def environment() -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH (for ``python -m vitcompress``)."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("page")
    data = image_directory(work / "images")
    common = dict(data=str(data), random_init=True, model_args={"depth": 2})
    sensitive = sensitivity("vit_fmnist", "svd", overrides=CONVERT, groups=2, images=20, runs=3, **common)
    (work / "sensitivity.json").write_text(sensitive.model_dump_json())
    vitcompress.convert("vit_fmnist", "svd", out_dir=work / "out", overrides=CONVERT,
                        sensitivity=work / "sensitivity.json", **common)
    return work / "out"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    assert not missing, f"{missing} missing: apt-get install chromium chromium-driver (make test does)"
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(driver, page: Path | str) -> None:
    """Load ``page`` (a file or a URL) and wait until its charts are drawn (the page sets ``data-charts``)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop the previous page's messages
    driver.get(page if isinstance(page, str) else page.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.charts"))
    assert driver.execute_script("return document.body.dataset.charts") == "ready"


def errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def count(driver, selector: str) -> int:
    return driver.execute_script(f"return document.querySelectorAll({json.dumps(selector)}).length")


def test_the_ladder_is_measured_where_it_must_differ(bundle):
    report = json.loads((bundle / "report.json").read_text())
    rungs = {r["name"]: r for r in report["explain"]["ladder"]["rungs"]}
    assert list(rungs) == list(RUNGS) and not any(r["skipped"] for r in rungs.values())
    assert rungs["original"]["agreement"] == 1.0 and rungs["original"]["logit_gap"] == 0.0
    assert rungs["transformed"]["logit_gap"] > 0  # SVD at 1/8 rank changes the logits
    assert rungs["finetuned"]["logit_gap"] != rungs["transformed"]["logit_gap"]  # the fine-tune changed weights
    # the float32 export is the fine-tuned model: the same classes, logits to parity
    predictions = np.load(bundle / "predictions.npz")
    np.testing.assert_array_equal(predictions["rung_onnx_fp32"], predictions["rung_finetuned"])
    assert abs(rungs["onnx_fp32"]["logit_gap"] - rungs["finetuned"]["logit_gap"]) < 1e-4
    assert rungs["quantized"]["logit_gap"] != rungs["onnx_fp32"]["logit_gap"]  # int8 weights
    assert all(r["images"] == report["validation"]["images"] == 30 and r["seconds"] > 0 for r in rungs.values())
    assert report["data"]["split"]["kind"] == "held-out"


def test_report_page_in_chromium(bundle, browser):
    report = json.loads((bundle / "report.json").read_text())
    assert (bundle / "report.html").stat().st_size < 4 << 20
    open_page(browser, bundle / "report.html")
    rows = browser.find_elements("css selector", "#ladder tr[data-rung]")
    assert [row.get_attribute("data-rung") for row in rows] == list(RUNGS)
    for row, rung in zip(rows, report["explain"]["ladder"]["rungs"]):
        cells = row.find_elements("css selector", "td[data-value]")
        values = [float(cell.get_attribute("data-value")) for cell in cells]
        assert values == [rung["images"], rung["top1"], rung["agreement"], rung["logit_gap"], rung["seconds"]]
    batches, blocks = len(report["validation"]["models"]["original"]["latency"]), 2
    assert count(browser, "#latency-chart .bars .point path") == 2 * batches
    assert count(browser, "#blocks-chart .bars .point path") == 2 * blocks
    assert count(browser, "#e2e-chart .bars .point path") == 2
    assert count(browser, "#heatmap-chart .hm image") == 1
    shown = report["explain"]["shown"]
    assert 0 < len(shown) == count(browser, "#disagreements img")
    assert browser.execute_script("return [...document.querySelectorAll('#disagreements img')]"
                                  ".every(img => img.complete && img.naturalWidth > 0)")
    assert count(browser, "#classes tr") == 1 + len(FMNIST_CLASSES)
    assert "valid" in browser.find_element("css selector", ".cards").text
    assert errors(browser) == []


def test_report_command_rebuilds_the_page_from_the_bundle_alone(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    (copy / "report.html").unlink()
    (copy / "model.onnx").rename(tmp_path / "model.onnx")  # no model to run, and the checksums notice
    done = subprocess.run([sys.executable, "-m", "vitcompress", "report", str(copy)], capture_output=True,
                          text=True, env=environment())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(str((copy / "report.html").resolve()))
    assert "model.onnx is missing" in (copy / "report.html").read_text()
    (tmp_path / "model.onnx").rename(copy / "model.onnx")
    assert CliRunner().invoke(main, ["report", str(copy)]).exit_code == 0
    assert (copy / "report.html").read_bytes() == (bundle / "report.html").read_bytes()
    bad = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [
        f"error: {tmp_path} has no report.json: give the output directory of vitcompress convert"]


def test_an_injected_class_name_renders_as_text(bundle, browser, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    labels = (copy / "labels.txt").read_text().splitlines()
    (copy / "labels.txt").write_text("\n".join([INJECTED, *labels[1:]]) + "\n")
    assert CliRunner().invoke(main, ["report", str(copy)]).exit_code == 0
    open_page(browser, copy / "report.html")
    assert browser.execute_script("return window.injected") is None
    assert INJECTED in browser.find_element("id", "classes").text
    assert "labels.txt" in browser.find_element("id", "checksums").text  # the edited file is named
    assert "FAILED" in browser.find_element("css selector", ".cards").text


def test_batch_index_links_every_job_page(browser, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{transform: svd_lowrank, targets: ['blocks.0.mlp.fc1'], rank: 4, whitening: none}]\n"
                      "finetune: null\nvalidate: {images: 16, batch_sizes: [1], latency_runs: 3, warmup_runs: 1, "
                      "profile_runs: 0}\n")
    jobs = "\n".join(f"  - {{name: '{name}', model: vit_fmnist, recipe: r.yaml, set: [{rank}]}}"
                     for name, rank in (("rank-4", "steps.0.rank=4"), ("rank-8", "steps.0.rank=8")))
    (tmp_path / "m.yaml").write_text("version: 1\ndefaults: {random_init: true, data: fmnist,"
                                     f" timeout: 300}}\njobs:\n{jobs}\n")
    done = subprocess.run([sys.executable, "-m", "vitcompress", "batch", str(tmp_path / "m.yaml"), "--out",
                           str(tmp_path / "out"), "--smoke", "--jobs", "2"], capture_output=True, text=True,
                          env=environment())
    assert done.returncode == 0, done.stdout + done.stderr
    open_page(browser, tmp_path / "out" / "index.html")
    assert count(browser, "#scatter-chart .scatterlayer .point") == 2
    statuses = browser.find_elements("css selector", "#jobs td:nth-child(4)")
    assert [cell.text for cell in statuses] == ["pass (passed)"] * 2
    links = [link.get_attribute("href") for link in browser.find_elements("css selector", "#jobs a")]
    assert len(links) == 2 and errors(browser) == []
    for link, rank in zip(links, (4, 8)):
        open_page(browser, link)
        assert f"rank: {rank}" in browser.find_element("id", "recipe").text  # this job's own page
        assert browser.find_element("id", "no-blocks").is_displayed()  # profile_runs: 0, no per-block chart
        skipped = {row.get_attribute("data-rung")
                   for row in browser.find_elements("css selector", "#ladder tr.skipped")}
        assert skipped == {"finetuned", "quantized"}  # no fine-tune, no int8 in this recipe
        assert count(browser, "#latency-chart .bars .point path") == 2 and errors(browser) == []


def test_a_bad_sensitivity_file_is_one_error_line_and_writes_nothing(tmp_path):
    (tmp_path / "bad.json").write_text('{"model": 1}')
    result = CliRunner().invoke(main, ["convert", "vit_fmnist", "--recipe", "svd", "--random-init", "--out",
                                       str(tmp_path / "out"), "--sensitivity", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.output.strip().splitlines() == [
        f"error: --sensitivity {tmp_path / 'bad.json'} is not a vitcompress sensitivity.json: model: Input should be "
        "an object"]


def test_thumbnails_are_the_input_as_the_model_saw_it_shrunk_to_fit():
    import io

    import torch

    from vitcompress.ladder import THUMBNAIL, input_image

    levels = torch.linspace(0, 1, 224).repeat(3, 224, 1)  # a grey ramp, left to right
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (levels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with Image.open(io.BytesIO(input_image(normalised, mean, std, THUMBNAIL))) as image:
        assert image.size == (THUMBNAIL, THUMBNAIL) and image.mode == "RGB"
        row = np.asarray(image)[0, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and (np.diff(row) >= 0).all()
