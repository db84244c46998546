"""Open a report.html in headless Chromium and check that it loads cleanly; save a screenshot.

    .venv/bin/python benchmarks/report_render.py                     # a fresh synthetic run folder
    .venv/bin/python benchmarks/report_render.py RUN_DIR [RUN_DIR ...] # smm report on real run folders
    .venv/bin/python benchmarks/report_render.py --html path/to/report.html
    options: --out DIR (default runs/report_render/, git-ignored), --chromium PATH, --height PX

Without arguments the input is reproducible: the small run folder of
``tests/support/report_runs.py`` (three sites, random predictions with a fixed seed, every newer
run-folder field present) is written under ``--out`` and reported on with ``server.report.build``.

Checks (any failure: exit status 1, reasons on stderr; ``--out``/result.json has the details):

One Chromium launch loads the page once and gives the DOM, the screenshot and the net log:

* the DOM Chromium built (``--dump-dom``) holds every report section, a figure per expected plot,
  only ``data:`` image sources, and no script;
* the page logged nothing to the console (``--enable-logging=stderr``: no ``CONSOLE`` line);
* the page made no network request (``--log-net-log``: no URL request whose network isolation key is
  the page's ``file://`` origin; Chromium's own background requests are listed but not counted);
* the screenshot (``--screenshot``, ``--window-size=1280,HEIGHT``) is a PNG of that size that is not
  blank.

Chromium runs with a fresh ``--user-data-dir`` and with background networking, component updates,
sync and QUIC off, so nothing outside the machine is needed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ("results", "curves", "test", "classification", "survival", "coordination", "summary", "limits",
            "provenance")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0")


def find_chromium(explicit: str | None = None) -> str | None:
    for cand in (explicit, "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


class _Dom(HTMLParser):
    """Section ids, figures per section, image sources and scripts of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, int] = {}
        self.current: str | None = None
        self.img_src: list[str] = []
        self.scripts = 0
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and a.get("id"):
            self.current = a["id"]
            self.sections[self.current] = 0
        elif tag == "img":
            self.img_src.append(a.get("src") or "")
            if self.current is not None:
                self.sections[self.current] += 1
        elif tag == "script":
            self.scripts += 1
        elif tag in ("link", "iframe", "object", "embed", "video", "audio", "source"):
            self.links.append(tag)

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None


def _run(chromium: str, args: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


def _page_requests(netlog: Path) -> tuple[list[str], list[str]]:
    """(requests made by the page, Chromium's own requests) from a net log."""
    text = netlog.read_text(encoding="utf-8", errors="replace")
    try:
        log = json.loads(text)
    except ValueError:  # a log whose writer was cut short lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    page, browser = [], []
    for ev in log.get("events", []):
        if names.get(ev.get("type")) != "URL_REQUEST_START_JOB":
            continue
        p = ev.get("params") or {}
        url = p.get("url")
        if not url:
            continue
        (page if "file://" in str(p.get("network_isolation_key", "")) or p.get("initiator") == "null"
         else browser).append(url)
    return page, browser


def _blank(png: Path) -> bool:
    from PIL import Image

    with Image.open(png) as im:
        lo, hi = im.convert("L").getextrema()
    return hi - lo < 10


def check_report(html: Path, out: Path, *, chromium: str | None = None, height: int = 4000,
                 expected_figures: dict[str, int] | None = None, timeout: float = 120.0) -> dict:
    """Load ``html`` in headless Chromium; returns a result dict with ``ok`` and ``failures``."""
    exe = find_chromium(chromium)
    if exe is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
    html = Path(html).resolve()
    out.mkdir(parents=True, exist_ok=True)
    url = html.as_uri()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="report-render-") as tmp:
        tmp = Path(tmp)
        netlog = tmp / "netlog.json"
        shot = out / "report.png"
        shot.unlink(missing_ok=True)
        t0 = time.perf_counter()  # one launch: DOM, screenshot and net log of the same page load
        dom_run = _run(exe, [f"--log-net-log={netlog}", "--dump-dom", f"--screenshot={shot}",
                             f"--window-size=1280,{height}", url], tmp / "profile", timeout)
        seconds = time.perf_counter() - t0
        page_requests, browser_requests = _page_requests(netlog) if netlog.exists() else ([], [])
        if not netlog.exists():
            failures.append("Chromium wrote no net log")
    if dom_run.returncode != 0:
        failures.append(f"chromium exited with {dom_run.returncode}")
    console = [line for line in dom_run.stderr.splitlines() if "CONSOLE" in line]
    if console:
        failures.append(f"{len(console)} console message(s): {console[:3]}")
    if page_requests:
        failures.append(f"the page made {len(page_requests)} network request(s): {page_requests[:3]}")
    dom = _Dom()
    dom.feed(dom_run.stdout)
    missing = [s for s in SECTIONS if s not in dom.sections]
    if missing:
        failures.append(f"sections missing from the DOM: {missing}")
    if not dom.img_src:
        failures.append("no figure in the DOM")
    external = [s[:60] for s in dom.img_src if not s.startswith("data:image/")]
    if external:
        failures.append(f"image sources that are not embedded: {external}")
    if dom.scripts or dom.links:
        failures.append(f"unexpected elements: {dom.scripts} script(s), {dom.links}")
    for sec, n in (expected_figures or {}).items():
        if dom.sections.get(sec) != n:
            failures.append(f"section {sec}: {dom.sections.get(sec)} figure(s), expected {n}")
    if not re.search(r"<h1>[^<]*evaluation report", dom_run.stdout):
        failures.append("the DOM has no report title")
    if not shot.exists():
        failures.append("no screenshot written")
    else:
        from PIL import Image

        with Image.open(shot) as im:
            size = im.size
        if size != (1280, height):
            failures.append(f"screenshot is {size}, expected (1280, {height})")
        if _blank(shot):
            failures.append("the screenshot is blank")
    result = {"html": str(html), "chromium": exe, "version": subprocess.run([exe, "--version"], capture_output=True,
                                                                         text=True).stdout.strip(),
              "ok": not failures, "failures": failures, "screenshot": str(shot),
              "figures_per_section": dom.sections, "images": len(dom.img_src), "console_messages": console,
              "page_requests": page_requests, "browser_background_requests": len(browser_requests),
              "seconds": round(seconds, 2)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _synthetic_report(out: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from report_runs import write_run  # noqa: E402 - the tests' run-folder writer

    from server.report.build import write_report

    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    write_run(run, seed=0)
    return write_report([run])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="*", type=Path, metavar="RUN_DIR",
                    help="run folders to report on first (default: a synthetic run folder)")
    ap.add_argument("--html", type=Path, help="check this report.html instead of writing one")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "report_render",
                    help="where the screenshot and result.json go (default runs/report_render/)")
    ap.add_argument("--chromium", help="Chromium executable (default /usr/bin/chromium or on PATH)")
    ap.add_argument("--height", type=int, default=4000, help="screenshot height in pixels (width 1280)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.html:
        html = args.html
    elif args.run_dirs:
        sys.path.insert(0, str(ROOT))
        from server.report.build import write_report

        html = write_report(args.run_dirs, args.out / "report")
    else:
        html = _synthetic_report(args.out)
    try:
        result = check_report(html, args.out, chromium=args.chromium, height=args.height)
    except FileNotFoundError as e:
        print(f"report_render: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("ok", "failures", "screenshot", "figures_per_section", "seconds")},
                     indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
