"""Open the rendered book in headless Chromium as a reader would, and fail on visible breakage.

For every chapter page: the page loads; no error output, Python traceback, stderr output or
kernel/progress-bar warning is shown, nor papermill's injected-parameters cell; every image has
loaded (non-zero natural size); no figure is empty (all pixels alike); a chapter notebook has at
least one figure. The front page (``index``) shows no code at all (hide-input or remove-input
on every code cell); no page shows code that only plots or formats (tag it hide-input); no
element is wider than its column (``scrollWidth > clientWidth``: a table, a code line or a
figure that the reader must scroll sideways to see). The last two are failures when ``STRICT``
is True (or ``check(..., strict=True)``), notes otherwise. Every attention explorer (``ctr.book.explorer``) must draw a non-empty map, show a token
under the mouse, and change its picture when another head is chosen. A full-page screenshot of
each page, and one of the first explorer of a page, are saved to ``_build/screenshots/`` for a
human look. Pages are served over loopback (not file://) so images and canvases can be read back.
``make book`` skips pages whose HTML, images and explorer script are byte-identical to ones that
passed before (``screenshots/passed.json``); ``python -m ctr.book check`` checks every page.

    python -m ctr.book.htmlcheck [_build/html] [page ...]
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import re
import shutil
import sys
import threading
from pathlib import Path

from .layout import BookError

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NO_FIGURES = {"scorecard"}     # pages that are tables and text by design
FRONT = "index"                # the front page: no code at all
NOISE = ("IProgress not found", "TqdmWarning", "Kernel is running over TCP")
PLOTTING = r"plt\.|\.plot\(|figure_|sns\.|\.style\.|plt\b|subplots\("
# Shown plotting code and elements wider than their column fail the check (True) or are
# printed as notes (False).
STRICT = True

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
  for (const el of main.querySelectorAll('.output.stderr, .cell_output .stderr'))
    errors.push('stderr output shown: ' + el.innerText.slice(0, 200));
  if (main.querySelector('.tag_injected-parameters'))
    errors.push("papermill's injected-parameters cell is shown");
  for (const w of NOISE) if (main.innerText.includes(w)) errors.push('warning shown: ' + w);
  for (const el of main.querySelectorAll('.cell_output'))   // a cell's last value echoed
    if (/(Posix|Windows)Path\(/.test(el.innerText))
      errors.push('a path object is shown (end the cell with an assignment): ' + el.innerText.slice(0, 120));
  const code = [];                            // code a reader sees without opening a toggle
  for (const el of main.querySelectorAll('.cell_input'))
    if (el.getClientRects().length > 0) code.push(el.innerText.trim().slice(0, 300));
  const prose = main.cloneNode(true);        // the text a reader reads, code cells left out
  for (const el of prose.querySelectorAll('.cell_input, pre, code, script, .MathJax, .MathJax_Preview'))
    el.remove();
  const text = prose.textContent;
  const raw = text.match(/\\\(|\\\[|\$\$/g);   // TeX left as text: MathJax did not run
  if (raw) errors.push('unrendered math: ' + raw.length + ' TeX delimiters left as text');
  const dollars = text.match(/\$[^$\n]{0,120}[\\^_{][^$\n]{0,120}\$/g);
  if (dollars) errors.push('unrendered math: ' + dollars.slice(0, 3).join(' | '));
  const wide = [];                           // wider than its column: scrolled sideways
  for (const el of main.querySelectorAll('*')) {
    if (el.clientWidth === 0 || el.closest('.MathJax, .MathJax_Display, mjx-container')
        || !el.checkVisibility({checkVisibilityCSS: true})) continue;     // folded: not seen
    if (el.scrollWidth > el.clientWidth + 1) {
      const what = el.tagName.toLowerCase() + (el.className && typeof el.className === 'string'
                   ? '.' + el.className.trim().split(/\s+/).join('.') : '');
      wide.push(what + ' (' + el.scrollWidth + ' px in ' + el.clientWidth + ' px): '
                + (el.innerText || '').trim().slice(0, 80).replace(/\s+/g, ' '));
    }
  }
  return {title: document.title, errors, images, code, wide, text: main.innerText.length};
}"""

_PICTURE = """c => {      // a fingerprint of a canvas' pixels and how many colours it has
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 2166136261 >>> 0; const seen = new Set();
  for (let i = 0; i < d.length; i += 4) {
    h = Math.imul(h ^ (d[i] + 256 * d[i + 1] + 65536 * d[i + 2]), 16777619) >>> 0;
    if (seen.size < 8) seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
  }
  return {hash: h, colours: seen.size};
}"""


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    raise BookError("headless Chromium not found: install Debian's `chromium` "
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


def explorers(page, name: str, screenshots: Path) -> tuple[list[str], int]:
    """Problems with the attention explorers of an open page, and how many there are."""
    problems, boxes = [], page.locator(".ctr-explorer")
    for i in range(boxes.count()):
        box, tag = boxes.nth(i), f"{name}: explorer {i + 1}"
        try:
            page.wait_for_function("e => e.dataset.ready === '1' || e.dataset.error",
                                   arg=box.element_handle(), timeout=5000)
        except Exception:
            problems.append(f"{tag} was not drawn (is _static/ctr-explorer.js served?)")
            continue
        if box.get_attribute("data-error"):
            problems.append(f"{tag} failed: {box.get_attribute('data-error')}")
            continue
        heat = box.locator("canvas.ctr-explorer-heat")
        before = heat.evaluate(_PICTURE)
        if before["colours"] < 3:
            problems.append(f"{tag}: the attention map is empty (a single colour)")
        if i == 0:
            box.screenshot(path=str(screenshots / f"explorer-{name}.png"))
        heat.scroll_into_view_if_needed()     # the mouse only reaches what is in the viewport
        r = heat.bounding_box()
        page.mouse.move(r["x"] + 0.3 * r["width"], r["y"] + 0.8 * r["height"])   # below the diagonal
        tip = box.locator(".ctr-explorer-tip")
        if not (tip.is_visible() and "\u2192" in tip.inner_text()):
            problems.append(f"{tag}: no token shown under the mouse")
        page.mouse.move(0, 0)
        changed, tried = False, 0
        for which in ("head", "layer"):      # the head first; a one-head model: the layer
            sel = box.locator(f"select[aria-label={which}]")
            values = sel.locator("option").evaluate_all("os => os.map(o => o.value)")
            start = sel.input_value()
            for v in [v for v in values if v != start]:
                tried += 1
                sel.select_option(v)
                page.wait_for_timeout(30)
                if heat.evaluate(_PICTURE)["hash"] != before["hash"]:
                    changed = True
                    break
            sel.select_option(start)
            if tried:
                break
        if tried and not changed:
            problems.append(f"{tag}: choosing another head does not change the picture")
    return problems, boxes.count()


def fingerprint(html: Path, page: Path) -> str:
    """What a reader's browser gets for a page: its HTML, the images it shows, ctr's script and
    style sheet (a CSS edit can make an element overflow its column)."""
    h = hashlib.sha256(page.read_bytes())
    for src in sorted(set(re.findall(r'<img[^>]*src="([^"]+)"', page.read_text()))):
        f = (page.parent / src).resolve()
        h.update(f.read_bytes() if f.is_file() else b"missing " + src.encode())
    static = html / "_static"
    for f in sorted([*static.glob("ctr-explorer.*"), *static.glob("ctr-book.*")]):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _probe(page, n: str, screenshots: Path, strict: bool) -> tuple[list[str], dict]:
    problems = []
    page.wait_for_function(_MATH_DONE, timeout=30000)
    r = page.evaluate(_PROBE.replace("NOISE", json.dumps(NOISE)))
    page.screenshot(path=str(screenshots / f"{n}.png"), full_page=True)
    bad, r["explorers"] = explorers(page, n, screenshots)
    problems += bad
    for e in r["errors"]:
        problems.append(f"{n}: error output shown: {e!r}")
    if n == FRONT and r["code"]:
        problems.append(f"{n}: the front page shows code ({len(r['code'])} cells; tag them "
                        f"remove-input or hide-input), first: {r['code'][0][:120]!r}")
    r["plotting_code"] = [c for c in r["code"] if re.search(PLOTTING, c)]
    layout = [f"{n}: plotting/formatting code shown (tag it hide-input): {c[:120]!r}"
              for c in r["plotting_code"]]
    layout += [f"{n}: wider than its column: {w}" for w in _outermost(r["wide"])]
    r["layout"] = layout
    if strict:
        problems += layout
    for im in r["images"]:
        if not im["loaded"]:
            problems.append(f"{n}: image {im['src']} did not load")
        elif im["blank"]:
            problems.append(f"{n}: image {im['src']} is empty (a single colour)")
    if n not in NO_FIGURES and not r["images"]:
        problems.append(f"{n}: no figure on the page")
    return problems, r


def _outermost(wide: list[str]) -> list[str]:
    """One line per overflow: an element inside a wide one repeats it, keep the first few."""
    return wide[:5] + ([f"... and {len(wide) - 5} more"] if len(wide) > 5 else [])


def check(html: Path, names: list[str], screenshots: Path | None = None,
          only_changed: bool = False, strict: bool | None = None) -> dict:
    """Check the listed chapter pages; raises AssertionError listing every problem.
    ``only_changed``: skip pages identical (``fingerprint``) to ones that passed last time.
    ``strict``: shown plotting code and too-wide elements fail (None: ``STRICT``)."""
    strict = STRICT if strict is None else strict
    from playwright.sync_api import sync_playwright

    html = Path(html)
    screenshots = Path(screenshots or html.parent / "screenshots")
    screenshots.mkdir(parents=True, exist_ok=True)
    passed_file = screenshots / "passed.json"
    passed = json.loads(passed_file.read_text()) if passed_file.exists() else {}
    problems, report, same = [], {}, []
    targets = pages(html, names)
    for n, p in list(targets.items()):
        if not p.exists():
            problems.append(f"{n}: page {p} was not built")
            del targets[n]
        elif only_changed and passed.get(n) == fingerprint(html, p):
            same.append(n)
            del targets[n]
    if targets:
        with serve(html) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=FLAGS[1:],
                                         headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for n, p in targets.items():
                passed.pop(n, None)
                url = f"{base}/{p.relative_to(html).as_posix()}"
                resp = page.goto(url, wait_until="load")
                if resp is None or resp.status != 200:
                    problems.append(f"{n}: {url} answered {resp.status if resp else 'nothing'}")
                    continue
                bad, report[n] = _probe(page, n, screenshots, strict)
                problems += bad
                if not bad:
                    passed[n] = fingerprint(html, p)
            browser.close()
    passed_file.write_text(json.dumps(passed, indent=1, sort_keys=True))
    if problems:
        raise AssertionError("rendered-book check failed:\n  " + "\n  ".join(problems))
    print(f"[ctr.htmlcheck] {len(report)} pages ok"
          + "".join(f"; {k}: {len(v['images'])} figures"
                    + (f", {v['explorers']} explorer(s)" if v["explorers"] else "")
                    for k, v in report.items())
          + (f"; {len(same)} unchanged since they passed ({', '.join(same)})" if same else "")
          + f"; screenshots in {screenshots}")
    notes = [line for v in report.values() for line in v["layout"]]
    if notes and not strict:
        print("[ctr.htmlcheck] notes (failures once htmlcheck.STRICT is True):\n  "
              + "\n  ".join(notes))
    return report


def main(argv=None) -> int:
    from .layout import HTML, toc_notebooks

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
