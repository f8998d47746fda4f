"""Open the rendered book in headless Chromium as a reader would, and fail on visible breakage.

For every chapter page: the page loads; no error output or Python traceback is shown; every
image has loaded (non-zero natural size); no figure is empty (all pixels alike); a chapter
notebook has at least one figure. A full-page screenshot of each page is saved to
``_build/screenshots/`` for a human look. Pages are served over loopback (not file://) so the
images can be read back through a canvas.

    python -m ctr.book.htmlcheck [_build/html] [page ...]
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NO_FIGURES = {"scorecard"}     # pages that are tables and text by design

_MATH_DONE = """() => !document.querySelector('.math') ||
  (window.MathJax && window.MathJax.Hub && window.MathJax.isReady && window.MathJax.Hub.queue.pending === 0
   && window.MathJax.Hub.queue.running === 0)"""

_PROBE = r"""() => {
  const main = document.querySelector('main') || document.body;
  const errors = [];
  for (const el of main.querySelectorAll('.output.traceback, .output.error, .cell_output .traceback'))
    errors.push(el.innerText.slice(0, 300));
  for (const el of main.querySelectorAll('pre'))
    if (el.innerText.includes('Traceback (most recent call last)')) errors.push(el.innerText.slice(0, 300));
  const images = [];
  for (const img of main.querySelectorAll('img')) {
    const r = {src: img.getAttribute('src'), loaded: img.complete && img.naturalWidth > 0,
               w: img.naturalWidth, h: img.naturalHeight, blank: null};
    if (r.loaded) {
      const c = document.createElement('canvas');
      c.width = Math.min(img.naturalWidth, 400); c.height = Math.min(img.naturalHeight, 400);
      const ctx = c.getContext('2d');
      ctx.drawImage(img, 0, 0, c.width, c.height);
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      let distinct = new Set();
      for (let i = 0; i < d.length && distinct.size < 8; i += 4 * 7)
        distinct.add((d[i] >> 3) + ',' + (d[i+1] >> 3) + ',' + (d[i+2] >> 3));
      r.blank = distinct.size < 3;
    }
    images.push(r);
  }
  const prose = main.cloneNode(true);        // the text a reader reads, code cells left out
  for (const el of prose.querySelectorAll('.cell_input, pre, code, script, .MathJax, .MathJax_Preview'))
    el.remove();
  const text = prose.textContent;
  const raw = text.match(/\\\(|\\\[|\$\$/g);   // TeX left as text: MathJax did not run
  if (raw) errors.push('unrendered math: ' + raw.length + ' TeX delimiters left as text');
  const dollars = text.match(/\$[^$\n]{0,120}[\\^_{][^$\n]{0,120}\$/g);
  if (dollars) errors.push('unrendered math: ' + dollars.slice(0, 3).join(' | '));
  return {title: document.title, errors, images, text: main.innerText.length};
}"""


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    raise RuntimeError("headless Chromium not found: install Debian's `chromium` "
                       "(`make chromium` does it) to check the rendered book")


@contextlib.contextmanager
def serve(root: Path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


def pages(html: Path, names: list[str]) -> dict[str, Path]:
    out = {}
    for n in names:
        p = html / "book" / "executed" / f"{n}.html"
        if n == "index" and not p.exists():
            p = html / "index.html"
        out[n] = p
    return out


def check(html: Path, names: list[str], screenshots: Path | None = None) -> dict:
    """Check the listed chapter pages; raises AssertionError listing every problem."""
    from playwright.sync_api import sync_playwright

    html = Path(html)
    screenshots = Path(screenshots or html.parent / "screenshots")
    screenshots.mkdir(parents=True, exist_ok=True)
    problems, report = [], {}
    targets = pages(html, names)
    for n, p in targets.items():
        if not p.exists():
            problems.append(f"{n}: page {p} was not built")
    with serve(html) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=FLAGS[1:], headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for n, p in targets.items():
            if not p.exists():
                continue
            url = f"{base}/{p.relative_to(html).as_posix()}"
            resp = page.goto(url, wait_until="load")
            if resp is None or resp.status != 200:
                problems.append(f"{n}: {url} answered {resp.status if resp else 'nothing'}")
                continue
            page.wait_for_function(_MATH_DONE, timeout=30000)
            r = page.evaluate(_PROBE)
            page.screenshot(path=str(screenshots / f"{n}.png"), full_page=True)
            report[n] = r
            for e in r["errors"]:
                problems.append(f"{n}: error output shown: {e!r}")
            for im in r["images"]:
                if not im["loaded"]:
                    problems.append(f"{n}: image {im['src']} did not load")
                elif im["blank"]:
                    problems.append(f"{n}: image {im['src']} is empty (a single colour)")
            if n not in NO_FIGURES and not r["images"]:
                problems.append(f"{n}: no figure on the page")
        browser.close()
    if problems:
        raise AssertionError("rendered-book check failed:\n  " + "\n  ".join(problems))
    print(f"[ctr.htmlcheck] {len(report)} pages ok; "
          + ", ".join(f"{k}: {len(v['images'])} figures" for k, v in report.items())
          + f"; screenshots in {screenshots}")
    return report


def main(argv=None) -> int:
    from .runner import HTML, toc_notebooks

    argv = list(sys.argv[1:] if argv is None else argv)
    html = Path(argv.pop(0)) if argv and Path(argv[0]).is_dir() else HTML
    try:
        check(html, argv or toc_notebooks())
    except (AssertionError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
