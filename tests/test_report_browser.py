"""The smoke run's HTML reports opened in headless Chromium: every figure shows (no broken images)
and the run's index links only to files that exist.

A copy of each report gets a small script that, once the page has loaded, writes the natural size of
every ``<img>`` into the DOM; Chromium's ``--dump-dom`` prints it. Chromium comes from ``make
chromium``; without it the test is skipped, unless the environment variable ``CI`` is set, in which
case it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from saltlib import runner

PROBE = """
<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    var imgs = Array.prototype.slice.call(document.images).map(function (i) {
      return {w: i.naturalWidth, h: i.naturalHeight, complete: i.complete, src: i.src.slice(0, 30)};
    });
    var links = Array.prototype.slice.call(document.links).map(function (a) { return a.href; });
    var out = document.createElement("pre");
    out.id = "salt-probe";
    out.textContent = JSON.stringify({images: imgs, links: links, title: document.title});
    document.body.appendChild(out);
  }, 200);
});
</script>
"""


def _chromium() -> str:
    for name in (os.environ.get("SALT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is not installed (run `make chromium`); required when CI is set")
    pytest.skip("headless Chromium not installed (`make chromium` installs it)")


def probe(page: Path, tmp_path: Path) -> dict:
    """Open a copy of ``page`` (with :data:`PROBE` added) in headless Chromium; return what it saw."""
    html = page.read_text()
    html = html.replace("</body>", PROBE + "</body>") if "</body>" in html else html + PROBE
    # the copy lives in tmp_path; <base> keeps the page's relative links pointing at its own folder
    base = f'<base href="{page.parent.as_uri()}/">'
    html = re.sub(r"<head([^>]*)>", lambda m: m.group(0) + base, html, count=1)
    copy = tmp_path / f"probe-{page.name}"
    copy.write_text(html)
    try:
        proc = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
             "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        copy.unlink(missing_ok=True)
    m = re.search(r'<pre id="salt-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"Chromium did not run the probe (exit {proc.returncode}): {proc.stderr[-2000:]}"
    text = m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


@pytest.fixture(scope="module")
def smoke(request):
    _chromium()  # skip before asking for the smoke run
    return request.getfixturevalue("smoke_ok")


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("nb", runner.NOTEBOOKS)
def test_report_figures_render(smoke, nb, tmp_path):
    seen = probe(smoke.run_dir / f"{nb}.html", tmp_path)
    images = seen["images"]
    assert images, f"{nb}.html shows no figures"
    broken = [i for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert not broken, f"{nb}.html: {len(broken)} of {len(images)} images broken: {broken[:3]}"


@pytest.mark.slow
@pytest.mark.realdata
def test_run_index_links_resolve(smoke, tmp_path):
    seen = probe(smoke.run_dir / "index.html", tmp_path)
    local = [Path(unquote(urlparse(h).path)) for h in seen["links"] if h.startswith("file:")]
    names = {p.name for p in local}
    for nb in runner.NOTEBOOKS:
        assert f"{nb}.html" in names
    missing = [str(p) for p in local if not p.exists()]
    assert not missing, f"index.html links to missing files: {missing}"
