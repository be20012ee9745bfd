"""mkdocs hook (mkdocs.yml: hooks): the navigation, built from the catalog's families so
that a new family (a new catalog module) gets its page in the menu without an edit here,
and from the optional pages docs/generate.py copied (fine-tuning.md, ...)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def on_config(config, **kwargs):
    sys.path.insert(0, str(ROOT / "src"))
    from losskit.catalog import FAMILIES

    docs = Path(config["docs_dir"])
    families = [{title.split(":")[0]: f"losses/{family}.md"} for family, title in FAMILIES.items()
                if (docs / "losses" / f"{family}.md").exists()]
    optional = [{"Fine-tuning: DPO, GRPO, distillation": "fine-tuning.md"}]
    config["nav"] = [
        {"Getting started": "index.md"},
        {"Training an LLM": "llm.md"},
        *[page for page in optional if (docs / next(iter(page.values()))).exists()],
        {"Which loss": "choosing.md"},
        {"Losses": families},
        {"The tour": "tour.md"},
        {"Bad input": "errors.md"},
        {"Performance": "performance.md"},
        {"API reference": "api.md"},
    ]
    return config
