"""Named activation sites, interchangeable with TransformerLens / SAELens hook strings.

``Site(layer=6, point="resid_pre")`` <-> ``"blocks.6.hook_resid_pre"``. Sites order by (layer, point
order inside a block), which is the order the forward pass visits them.
"""

import dataclasses
import re

POINTS = ("resid_pre", "resid_mid", "resid_post")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post)$")

_MSG_BAD_SITE = (
    "Unsupported hook name {name!r}: jaxrecover intervenes on residual-stream sites only, written "
    "'blocks.{{L}}.hook_resid_pre', 'blocks.{{L}}.hook_resid_mid' or 'blocks.{{L}}.hook_resid_post'."
)


@dataclasses.dataclass(frozen=True)
class Site:
    """A residual-stream site: block ``layer``, ``point`` in ``POINTS``."""

    layer: int
    point: str = "resid_pre"

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(f"Unknown site point {self.point!r}; expected one of {POINTS}.")
        if self.layer < 0:
            raise ValueError(f"Site layer must be >= 0, got {self.layer}.")

    @property
    def order(self) -> tuple[int, int]:
        """Visit order in the forward pass."""
        return (self.layer, POINTS.index(self.point))

    @classmethod
    def parse(cls, name: "str | Site") -> "Site":
        """Parse ``blocks.{L}.hook_{point}`` (a Site passes through)."""
        if isinstance(name, Site):
            return name
        m = _SITE_RE.match(name.strip())
        if m is None:
            raise ValueError(_MSG_BAD_SITE.format(name=name))
        return cls(int(m.group(1)), m.group(2))

    def __lt__(self, other: "Site") -> bool:
        return self.order < other.order

    def __str__(self) -> str:
        return f"blocks.{self.layer}.hook_{self.point}"
