"""The docs site: its generated pages are current, every option has a meaning in the code, the README stays short,
the site builds with ``mkdocs build --strict``, and a real browser renders its methods table and code blocks.

The build needs the ``docs`` extra (``pip install -e ".[docs]"``) and is skipped without it; the browser test also
needs Debian's chromium and Playwright's Python package, as the demo's browser test does.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gclip.docs import COMMAND, generate, main, option_docs, stale
from gclip.methods import list_methods, method_class

ROOT = Path(__file__).parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def test_generated_pages_are_current():
    bad = stale(ROOT)
    assert not bad, f"stale generated docs ({', '.join(bad)}): run `{COMMAND}` and commit the result"


def test_the_command_writes_checks_and_removes(tmp_path, capsys):
    """`python -m gclip.docs` on a copy of the checkout's inputs: it writes every page, `--check` passes, then fails
    on an edited page or a page of no method, which the next run rewrites or removes."""
    assert main(["--root", str(tmp_path)]) == 2  # not a checkout: no mkdocs.yml
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(ROOT / "docs" / "methods" / "notes", tmp_path / "docs" / "methods" / "notes")
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks")
    assert main(["--root", str(tmp_path)]) == 0 and main(["--root", str(tmp_path), "--check"]) == 0
    assert sorted(p.name for p in (tmp_path / "docs" / "methods").glob("*.md")) == sorted(
        [f"{n}.md" for n in list_methods()] + ["index.md"]
    )
    (tmp_path / "docs" / "generated" / "datasets.md").write_text("edited by hand\n")
    (tmp_path / "docs" / "methods" / "gone.md").write_text("a method that was removed\n")
    capsys.readouterr()
    assert main(["--root", str(tmp_path), "--check"]) == 1
    assert capsys.readouterr().out.split() == ["stale:", "docs/generated/datasets.md", "stale:", "docs/methods/gone.md"]
    assert main(["--root", str(tmp_path)]) == 0 and not (tmp_path / "docs" / "methods" / "gone.md").exists()
    assert main(["--root", str(tmp_path), "--check"]) == 0


@pytest.mark.parametrize("name", list_methods())
def test_every_option_has_its_meaning_in_the_code(name):
    cls = method_class(name)
    documented = option_docs(cls)
    options = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    missing = [o for o in options if not documented.get(o)]
    assert not missing, f"{cls.__module__}.{cls.__name__}: add {missing} to the docstring's 'Attributes:' section"
    assert not set(documented) - set(options), f"{name}: the docstring documents options the class does not have"


def test_each_method_page_lists_every_option_and_its_protocol():
    pages = generate(ROOT)
    for name in list_methods():
        page = pages[f"docs/methods/{name}.md"]
        cls = method_class(name)
        rows = [line.split(" | ")[0] for line in page.splitlines() if line.startswith("| `")]
        for f in dataclasses.fields(cls):
            if not f.name.startswith("_"):
                assert any(f"`{f.name}`" in row for row in rows), (name, f.name)
        assert f"presets/{cls.protocol}.toml" in page and "| `voc21` |" in page, name
        assert f"[`{name}`]({name}.md)" in pages["docs/methods/index.md"]


def test_option_docs_reads_grouped_and_continued_entries():
    class Example:
        """Options.

        Attributes:
            a, b: shared text
                continued here.
            c: its own.

        Note: not an option.
        """

    shared = "shared text continued here."
    assert option_docs(Example) == {"a": shared, "b": shared, "c": "its own."}


def test_readme_is_short_and_links_into_the_site():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in ("getting-started", "how-it-works", "methods/index", "evaluation", "fidelity", "adding-a-method"):
        assert f"](docs/{page}.md)" in text, page
        assert (ROOT / "docs" / f"{page}.md").is_file(), page


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built with ``mkdocs build --strict`` (a warning fails it) into a temporary folder."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])  # this checkout's gclip
    env = dict(os.environ, PYTHONPATH=path, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.heavy
def test_site_builds_strict_with_every_page(site):
    for name in list_methods():
        assert (site / "methods" / name / "index.html").is_file(), name
    assert (site / "api" / "index.html").read_text().count('class="doc doc-heading"') > 10  # docstrings rendered
    assert (site / "benchmarks" / "cpu-vitb16-gclip.json").is_file()  # the raw runs the Performance page links


@pytest.fixture(scope="module")
def served(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.browser
def test_browser_renders_the_methods_table_and_code(served, tmp_path):
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    start = time.perf_counter()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.goto(served + "/")
            table = page.locator("article table").filter(has_text="what it changes").first
            table.wait_for()
            rows = table.locator("tbody tr")
            assert rows.count() == len(list_methods())
            assert table.is_visible() and table.bounding_box()["height"] > 100
            assert "gclip" in rows.first.inner_text() or "clip" in rows.first.inner_text()
            code = page.locator("article pre code").first
            assert code.is_visible() and "gclip segment" in code.inner_text()
            nav = page.locator("nav").filter(has_text="Methods").first.inner_text()
            assert "Getting started" in nav and "Adding a method" in nav

            page.goto(served + "/methods/proxyclip/")
            assert page.locator("article h1").first.inner_text().startswith("ProxyCLIP")
            options = page.locator("article table").filter(has_text="meaning").first
            assert options.is_visible() and "proxy_checkpoint" in options.inner_text()
            protocol = page.locator("article table").filter(has_text="logit_scale").first
            assert protocol.locator("tbody tr").count() >= 8  # one row per dataset
            example = page.locator("article pre code").filter(has_text="--method proxyclip").first
            assert example.is_visible() and example.locator("span").count() > 3  # highlighted, not raw text
            assert page.locator("nav a.md-nav__link--active").filter(has_text="proxyclip").count() >= 1
            assert not errors, errors
        finally:
            browser.close()
    assert time.perf_counter() - start < 120
