"""Serve the dashboard and look at it in a headless system Chromium (Selenium).

Used by the real-browser test and to take the README's screenshots:

    python -m experiments.dashboard.browser --db results/experiments.db --out docs/img

`CHROMIUM` and `CHROMEDRIVER` are Debian's `chromium` and `chromium-driver`
(`apt-get install chromium chromium-driver`); `browser_missing()` says why none can run.
"""

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
# A page is drawn when Streamlit has stopped running its script and Vega has drawn a chart.
CHART = ".vega-embed canvas, .vega-embed svg"


def browser_missing():
    """Why no headless browser can run here (None when one can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"no {path} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(db, port=None, host=None, timeout=60, log_file=None):
    """`python main_train.py dashboard --db DB` on a free port (and `--host`, if given);
    yields its URL once Streamlit answers its health check, and stops it (the whole
    process group) after."""
    port = port or free_port()
    out = open(log_file, "w") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main_train.py"), "dashboard", "--db", db,
                             "--port", str(port), *(["--host", host] if host else [])], cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{host or '127.0.0.1'}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"The dashboard exited with code {proc.returncode} before answering"
                                   + (f"; see {log_file}" if log_file else ""))
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"The dashboard did not answer on {url} within {timeout} s")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if log_file:
            out.close()


@contextlib.contextmanager
def chrome(width=1400, height=1000):
    """A headless Chromium driven by Selenium, on the system browser and driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def load(driver, url, timeout=60, chart=True):
    """Opens `url` and waits until the app has run (and drawn a chart, with `chart`);
    returns the page's visible text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout, poll_frequency=0.2)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='stMain'] h1"))
    if chart:
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, CHART))
    # Done when Streamlit's running indicator is gone and the text stops changing.
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']"))
        text = driver.find_element(By.TAG_NAME, "body").text
        if text == last:
            return text
        last = text
        time.sleep(0.5)
    raise TimeoutError(f"{url} kept changing for {timeout} s")


def screenshot(driver, path, height=None):
    """A PNG of the page; `height` (pixels) resizes the window first, to show more of it."""
    if height:
        driver.set_window_size(driver.get_window_size()["width"], height)
        time.sleep(0.5)  # the layout and charts settle
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    driver.save_screenshot(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Screenshots of the dashboard's Runs and Compare pages.")
    parser.add_argument("--db", default="results/experiments.db")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--experiment", default="cifar", help="The Compare page's experiment.")
    args = parser.parse_args(argv)
    reason = browser_missing()
    if reason:
        raise SystemExit(f"Cannot take screenshots: {reason}")
    with serve(args.db) as url, chrome(1500, 1000) as driver:
        for name, query, height in (("dashboard_runs.png", "page=Runs", 1000),
                                    ("dashboard_compare.png", f"page=Compare&experiment={args.experiment}", 1750)):
            driver.set_window_size(1500, height)
            load(driver, f"{url}/?{query}", chart=name != "dashboard_runs.png")
            print("wrote", screenshot(driver, os.path.join(args.out, name)))


if __name__ == "__main__":
    main()
