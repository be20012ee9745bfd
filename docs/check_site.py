"""Check the built site: every loss has its section, every internal link and anchor resolves,
and nothing is fetched from the network.

    python docs/check_site.py      (make docs runs it after mkdocs build)
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "site"


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        for attr in ("href", "src"):
            url = values.get(attr)
            if not url:
                continue
            if tag in ("link", "script", "img") and url.startswith(("http://", "https://", "//")):
                self.remote.append(url)  # a page that needs the network to render
            elif tag == "a" or attr == "src":
                self.links.append(url)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from losskit.catalog import ENTRIES

    pages = {path.resolve(): parse(path) for path in SITE.rglob("*.html")}
    problems: list[str] = []
    for path, page in pages.items():
        for url in page.remote:
            problems.append(f"{path.relative_to(SITE.resolve())}: loads {url} from the network")
        for link in page.links:
            parsed = urlparse(link)
            if parsed.scheme or link.startswith(("mailto:", "//")):
                continue
            if not parsed.path:
                target = path
            elif parsed.path.startswith("/"):  # site-absolute (the 404 page)
                target = SITE / unquote(parsed.path).lstrip("/")
            else:
                target = path.parent / unquote(parsed.path)
            target = target.resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{path.relative_to(SITE.resolve())}: broken link {link}")
            elif parsed.fragment and target.suffix == ".html":
                if parsed.fragment not in pages.get(target, Page()).ids:
                    problems.append(f"{path.relative_to(SITE.resolve())}: missing anchor {link}")
    for entry in ENTRIES:
        family = (SITE / "losses" / entry.family / "index.html").resolve()
        if family not in pages or entry.key not in pages[family].ids:
            problems.append(f"{entry.key}: no section on losses/{entry.family}/")
    for problem in problems:
        print(problem)
    print(f"{len(pages)} pages, {len(ENTRIES)} losses: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
