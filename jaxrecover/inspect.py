"""Look at pytrees: models, SAEs, hooks and recovery results rendered with treescope (penzai's
interactive pretty-printer), as HTML files or plain text. Useful in notebooks and for the
``jaxrecover info --html`` command."""

from pathlib import Path
from typing import Any

import treescope  # installed with penzai; penzai's ``pz.show`` uses the same renderer


def to_text(tree: Any) -> str:
    """A compact text rendering (array leaves summarised by shape, dtype and statistics)."""
    return treescope.render_to_text(tree)


def save_html(tree: Any, path: str | Path) -> Path:
    """Write an interactive, self-contained HTML rendering of ``tree`` to ``path``."""
    with treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        html = treescope.render_to_html(tree, roundtrip_mode=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
