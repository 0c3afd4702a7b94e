"""MkDocs hooks: one nav entry per registered method, and the raw ``gclip bench`` records served beside the pages."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_config(config):
    """Expand the nav's ``Methods`` entry into the index and one page per method, in registry order."""
    from gclip.methods import list_methods, method_class

    for i, entry in enumerate(config.nav or []):
        if isinstance(entry, dict) and entry.get("Methods") == "methods/index.md":
            pages = [{"Overview": "methods/index.md"}]
            pages += [{f"{method_class(n).name}": f"methods/{n}.md"} for n in list_methods()]
            config.nav[i] = {"Methods": pages}
    return config


def on_files(files, config):
    """``benchmarks/**/*.json`` (the Performance page links each run) copied into the site as they are."""
    for path in sorted((ROOT / "benchmarks").rglob("*.json")):
        rel = path.relative_to(ROOT).as_posix()
        urls = config.use_directory_urls
        files.append(File(rel, src_dir=str(ROOT), dest_dir=config.site_dir, use_directory_urls=urls))
    return files



def on_page_markdown(markdown, page, config, files):
    """The Contributing page is CONTRIBUTING.md, whose links into the docs (``docs/<page>.md``, from the
    repository's root) become the same pages seen from the site."""
    if page.file.src_uri == "contributing.md":
        return (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8").replace("](docs/", "](")
    return markdown


_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):\s*<code>~?")


def on_page_content(html, page, config, files):
    """The docstrings' Sphinx roles (``:class:`~gclip.X```), which Markdown leaves as text, as plain code."""
    return _ROLE.sub("<code>", html)
