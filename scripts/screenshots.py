"""Take a PNG screenshot of every page of the visualizer (project/app.py) with headless Chromium.

    python scripts/screenshots.py [--port 8599] [--out docs/screenshots] [--pages tiles,dma] [--budget 15000]

What it does:

1. starts ``streamlit run project/app.py --server.headless true --server.port PORT`` in the background (from the
   repository root) and waits until ``/_stcore/health`` answers;
2. for each page (``?page=<key>``, the query parameter the app reads; ``sandbox_graph`` is
   ``?page=sandbox&section=graph``), runs headless Chromium::

       chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \\
           --disable-background-networking --disable-component-update --disable-sync \\
           --user-data-dir=$(mktemp -d) --window-size=1400,1000 --virtual-time-budget=15000 \\
           --screenshot=docs/screenshots/<page>.png http://localhost:PORT/?page=<page>

   (``--hide-scrollbars`` is added; the window height can be raised with ``--height``);
   A first, throwaway pass over the pages warms the server up (imports, caches); a screenshot that still shows
   the loading skeleton (no dark text pixels) or a running script (the "Stop" button top right) is taken again,
   up to ``--tries`` times;
3. stops the server it started.

Chromium is looked up as ``chromium``, ``chromium-browser``, ``google-chrome`` on the PATH. If none is installed:
``apt-get update && apt-get install -y chromium``. The script exits non-zero if the server does not come up or a
screenshot is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# screenshot name -> query string; the sandbox's second section (the autodiff graph) gets its own picture
PAGES = {
    "tiles": "page=tiles",
    "online_softmax": "page=online_softmax",
    "memory": "page=memory",
    "ring_buffer": "page=ring_buffer",
    "dma": "page=dma",
    "sandbox": "page=sandbox",
    "sandbox_graph": "page=sandbox&section=graph",
    "ring_attention": "page=ring_attention",
    "paged": "page=paged&step=10",  # the tour after a fork, a copy-on-write, a free and a second fork
}


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get update && apt-get install -y chromium")


def wait_healthy(port: int, timeout: float = 90.0) -> None:
    url = f"http://localhost:{port}/_stcore/health"
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"streamlit did not answer {url} within {timeout:.0f} s")


def rendered(path: str) -> bool:
    """Did the page finish rendering? A page still loading is a skeleton of light grey bars (no dark text pixels);
    a script still running shows a "Stop" button left of "Deploy" in the top-right corner."""
    if not os.path.exists(path):
        return False
    try:
        import numpy as np
        from PIL import Image

        grey = np.asarray(Image.open(path).convert("L"))
        running = int((grey[10:50, -200:-115] < 150).sum()) > 20
        return float((grey < 100).mean()) > 0.002 and not running
    except Exception:  # no PIL: judge by size (a skeleton PNG is ~10 KB)
        return os.path.getsize(path) > 25_000


def screenshot(chromium: str, url: str, path: str, width: int, height: int, budget: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--virtual-time-budget={budget}",
            f"--screenshot={path}", url,
        ]
        try:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False)
        except subprocess.TimeoutExpired:  # subprocess.run kills the browser; the caller retries
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8599)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "screenshots"))
    ap.add_argument("--pages", default=",".join(PAGES), help=f"comma-separated, from {','.join(PAGES)}")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=15000, help="Chromium --virtual-time-budget in ms")
    ap.add_argument("--tries", type=int, default=4, help="attempts per page until it is rendered")
    args = ap.parse_args()

    pages = [p for p in args.pages.split(",") if p]
    unknown = [p for p in pages if p not in PAGES]
    if unknown:
        sys.exit(f"unknown page(s) {unknown}; choose from {list(PAGES)}")
    chromium = find_chromium()
    os.makedirs(args.out, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", os.path.join(ROOT, "project", "app.py"),
         "--server.headless", "true", "--server.port", str(args.port), "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    missing = []
    try:
        wait_healthy(args.port)
        # Warm-up: the first session imports minitorch (numba) and fills the caches; a screenshot taken during that
        # would show a blank page. One throwaway pass over the pages, then the real one.
        with tempfile.TemporaryDirectory() as warm:
            for page in pages:
                screenshot(chromium, f"http://localhost:{args.port}/?{PAGES[page]}", os.path.join(warm, "w.png"),
                           args.width, args.height, args.budget)
        for page in pages:
            path = os.path.join(args.out, f"{page}.png")
            if os.path.exists(path):
                os.remove(path)
            url = f"http://localhost:{args.port}/?{PAGES[page]}"
            t0 = time.time()
            for attempt in range(args.tries):  # a page caught while still loading is taken again
                if attempt:
                    time.sleep(3)  # let the server finish the run the last attempt started
                screenshot(chromium, url, path, args.width, args.height, args.budget)
                if rendered(path):
                    break
            ok = rendered(path)
            print(f"{page:15s} {'ok' if ok else 'MISSING'}  {path}  ({time.time() - t0:.1f} s)")
            if not ok:
                missing.append(page)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server started above, and only it
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
