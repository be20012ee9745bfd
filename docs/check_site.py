"""Check the built site, and fail the build on what a reader should never meet:

- a broken link or anchor, a link to a directory (a file:// reader gets a listing), a page
  that loads anything from the network;
- a loss of the catalog without its section, or a section without its plot;
- in the API reference, a dunder entry (``__doc__``, ``__file__``, ...);
- reStructuredText left raw (``:func:`...```, ``.. math::``) on any page;
- a machine path (this checkout, site-packages, ``__pycache__``, ``.pyc``);
- a benchmark figure that differs from the CSV it comes from (bench.csv, catalog.csv), or
  a ratio on the performance page that is in neither;
- an extra of pyproject.toml that the home page does not mention.

    python docs/check_site.py      (make docs runs it after mkdocs build)
"""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "site"
RST = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|ref|math):`|^\s*\.\. [a-z]+::", re.M)
DUNDER = re.compile(r"(?:^|\.)__[a-z][a-z0-9_]*__$")
MACHINE = re.compile("|".join(re.escape(p) for p in (str(ROOT), "/work/", "/home/", "/tmp/", "site-packages",
                                                     "__pycache__", ".pyc", "/usr/lib")))


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.remote: list[str] = []
        self.headings: list[str] = []  # ids of h1-h6 (and of mkdocstrings' object headings)
        self.text: list[str] = []
        self.sections: dict[str, list[str]] = {}  # h2 id -> img srcs under it
        self._h2: str | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "style"):
            self._skip += 1
        if values.get("id"):
            self.ids.add(values["id"])
            if re.fullmatch(r"h[1-6]", tag):
                self.headings.append(values["id"])
        if tag == "h2":
            self._h2 = values.get("id")
            if self._h2:
                self.sections[self._h2] = []
        if tag == "img" and self._h2 and values.get("src"):
            self.sections[self._h2].append(values["src"])
        for attr in ("href", "src"):
            url = values.get(attr)
            if not url:
                continue
            if tag in ("link", "script", "img") and url.startswith(("http://", "https://", "//")):
                self.remote.append(url)  # a page that needs the network to render
            elif tag == "a" or attr == "src":
                self.links.append(url)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)

    @property
    def content(self) -> str:
        return " ".join(" ".join(self.text).split())


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _generate():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_links(pages: dict[Path, Page]) -> list[str]:
    problems = []
    site = SITE.resolve()
    for path, page in pages.items():
        where = path.relative_to(site)
        for url in page.remote:
            problems.append(f"{where}: loads {url} from the network")
        for link in page.links:
            parsed = urlparse(link)
            if parsed.scheme or link.startswith(("mailto:", "//")):
                continue
            if not parsed.path:
                target = path
            elif parsed.path.startswith("/"):  # site-absolute (the 404 page)
                target = site / unquote(parsed.path).lstrip("/")
            else:
                target = path.parent / unquote(parsed.path)
            target = target.resolve()
            if target.is_dir() or parsed.path.endswith("/"):
                problems.append(f"{where}: links to a directory ({link}): from disk that shows a listing")
            elif not target.exists():
                problems.append(f"{where}: broken link {link}")
            elif parsed.fragment and target.suffix == ".html":
                if parsed.fragment not in pages.get(target, Page()).ids:
                    problems.append(f"{where}: missing anchor {link}")
    return problems


def check_text(pages: dict[Path, Page]) -> list[str]:
    problems = []
    site = SITE.resolve()
    for path, page in pages.items():
        where = path.relative_to(site)
        text = page.content
        for match in RST.finditer(" ".join(page.text)):
            problems.append(f"{where}: raw reStructuredText {match.group().strip()!r}")
        for match in MACHINE.finditer(text):
            problems.append(f"{where}: a machine path ({text[max(0, match.start() - 40):match.end() + 40]!r})")
        for heading in page.headings:
            if DUNDER.search(heading):
                problems.append(f"{where}: a dunder entry {heading!r}")
    return problems


def check_losses(pages: dict[Path, Page]) -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from losskit.catalog import ENTRIES

    problems = []
    for entry in ENTRIES:
        family = (SITE / "losses" / f"{entry.family}.html").resolve()
        if family not in pages or entry.key not in pages[family].ids:
            problems.append(f"{entry.key}: no section on losses/{entry.family}.html")
            continue
        images = pages[family].sections.get(entry.key, [])
        plot = f"../img/{entry.key}.png"
        if plot not in images or not (family.parent / plot).resolve().exists():
            problems.append(f"{entry.key}: its section on losses/{entry.family}.html has no plot ({plot})")
    return problems


def check_figures(pages: dict[Path, Page]) -> list[str]:
    """The benchmark figures the site quotes are the CSVs' own."""
    generate = _generate()
    problems = []
    performance = pages.get((SITE / "performance.html").resolve())
    if performance is None:
        return ["performance.html is missing"]
    text = performance.content
    allowed: set[str] = set()
    for f in generate.bench_figures():
        shown = [f["losskit_time"], f["losskit_memory"], f["time"], f["memory"], f["time_ratio"], f["memory_ratio"]]
        allowed.update(shown)
        for value in shown:
            if value not in text:
                problems.append(f"performance.html: {f['label']} against {f['provider']}: bench.csv gives {value}, "
                                "not on the page")
        family = pages.get((SITE / "losses" / f"{_family(f['key'])}.html").resolve())
        if family is not None and f"{f['time_ratio']} the time, {f['memory_ratio']} the memory" not in family.content:
            problems.append(f"losses/{_family(f['key'])}.html: {f['key']} does not quote bench.csv's "
                            f"{f['time_ratio']} / {f['memory_ratio']} against {f['provider']}")
    catalog_csv = ROOT / "benchmarks" / "results" / "catalog.csv"
    if catalog_csv.exists():
        allowed.update(f"{float(r['ratio_to_torch']):.2f}x" for r in csv.DictReader(catalog_csv.open())
                       if r["ratio_to_torch"])
    for ratio in set(re.findall(r"(?<![\w.])\d+\.\d\dx\b", text)):
        if ratio not in allowed:
            problems.append(f"performance.html: the ratio {ratio} comes from neither bench.csv nor catalog.csv")
    return problems


def _family(key: str) -> str:
    from losskit.catalog import lookup

    return lookup(key).family


def check_extras(pages: dict[Path, Page]) -> list[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    index = pages.get((SITE / "index.html").resolve())
    text = index.content if index else ""
    return [f"index.html: the extra {name!r} is not mentioned" for name in extras if f"{name}" not in text.split()]


def main() -> int:
    pages = {path.resolve(): parse(path) for path in SITE.rglob("*.html")}
    problems = (check_links(pages) + check_text(pages) + check_losses(pages) + check_figures(pages)
                + check_extras(pages))
    for problem in problems:
        print(problem)
    from losskit.catalog import ENTRIES

    print(f"{len(pages)} pages, {len(ENTRIES)} losses: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
