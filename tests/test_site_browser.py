"""The built site in a real browser: headless Chromium renders the pages and the search box finds skills."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from skillbook import catalog
from skillbook.site import build as site

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed; `make browser` installs it"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Build the fixture repository's site and serve it on 127.0.0.1 (a free port)."""
    from test_site import make_repo

    repo = make_repo(tmp_path_factory.mktemp("repo"))
    out = tmp_path_factory.mktemp("site") / "site"
    site.build(out, root=repo)
    yield from _serve(out)


def _serve(out: Path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def chromium(tmp: Path, *args: str) -> str:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def screenshot(tmp: Path, url: str, name: str, size: str = "1280,1600") -> Path:
    path = tmp / f"{name}.png"
    chromium(tmp, f"--window-size={size}", f"--screenshot={path}", "--virtual-time-budget=3000", url)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def search_hits(tmp: Path, url: str) -> list[str]:
    """Load search.html?q=… with its JavaScript run; return the skill names rendered as results."""
    dom = chromium(tmp, "--virtual-time-budget=5000", "--dump-dom", url)
    assert 'id="search-results"' in dom, dom[:500]
    return re.findall(r'<li class="hit hit-[a-z]+" data-name="([^"]+)"', dom)


def test_pages_render_and_search_finds_a_skill_by_a_description_word(server, tmp_path):
    home = screenshot(tmp_path, f"{server}/index.html", "home")
    skill = screenshot(tmp_path, f"{server}/skills/toy-data/index.html", "skill")
    phone = screenshot(tmp_path, f"{server}/skills/toy-data/index.html", "skill-phone", size="390,1200")
    searched = screenshot(tmp_path, f"{server}/search.html?q=zebra", "search")
    # a rendered page is far bigger than a blank one (a blank 1280x1600 PNG is a few KB)
    assert all(p.stat().st_size > 20_000 for p in (home, skill, searched)), [
        p.stat().st_size for p in (home, skill, searched)
    ]
    assert phone.stat().st_size > 10_000
    # "zebra" appears only in toy-data's description; "quokka" only in toy-train's
    assert search_hits(tmp_path, f"{server}/search.html?q=zebra") == ["toy-data"]
    assert search_hits(tmp_path, f"{server}/search.html?q=quokka") == ["toy-train"]
    # headings are searchable too, and every word of the query must match
    assert search_hits(tmp_path, f"{server}/search.html?q=defaults+work") == ["toy-train"]  # a skill heading
    assert search_hits(tmp_path, f"{server}/search.html?q=knobs") == ["toy-data: Guide"]  # a reference's heading
    assert search_hits(tmp_path, f"{server}/search.html?q=zebra+quokka") == []


def test_search_on_the_real_library(tmp_path):
    skills = [s for s in catalog.load_all() if s.description]
    if not skills:
        pytest.skip("no skills with a description in skills/ yet")
    out = tmp_path / "site"
    site.build(out)
    gen = _serve(out)
    base = next(gen)
    try:
        skill = skills[0]
        others = " ".join(s.description.lower() for s in skills[1:])
        words = sorted(set(re.findall(r"[a-z]{5,}", skill.description.lower())), key=lambda w: (w in others, -len(w)))
        hits = search_hits(tmp_path, f"{base}/search.html?q={words[0]}")
        assert skill.name in hits, (words[0], hits)
        # a whole request: the page ranks skills the way `skills search` does (the same exported BM25 weights)
        from skillbook.catalog import search

        for request in ("my 7B model is too big for my laptop", "run my training on 8 GPUs",
                        "check my model did not just memorise the test set"):  # fmt: skip
            best = search.search(request).hits[0].name
            hits = search_hits(tmp_path, f"{base}/search.html?q={request.replace(' ', '+')}")
            assert hits and hits[0] == best, (request, best, hits)
        screenshot(tmp_path, f"{base}/skills/{skill.folder}/index.html", "real-skill")
    finally:
        gen.close()
