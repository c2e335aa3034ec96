"""The README's screenshot of report.html (docs/report-screenshot.png), taken by the tests' headless Chromium.

    python bench/report_screenshot.py runs/demo [--out docs/report-screenshot.png] [--height 1700]

Opens BUNDLE/report.html in Debian's chromium through Selenium and the system chromedriver (as
tests/test_report_page.py does), waits until the charts are drawn, and saves a 1200-pixel-wide PNG of the page's
top ``--height`` pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report-screenshot.png")
    parser.add_argument("--height", type=int, default=1700)
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size=1200,{args.height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get((args.bundle / "report.html").resolve().as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.charts"))
        if driver.execute_script("return document.body.dataset.charts") != "ready":
            raise SystemExit(f"error: the charts of {args.bundle}/report.html were not drawn")
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    print(args.out)


if __name__ == "__main__":
    main()
