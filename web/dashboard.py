"""Renders the dashboard's pages (`web/templates/dashboard/`) and holds its static files.

The pages use the report's environment (`web.render.environment`: autoescaped, strict undefined,
the same filters) and include the report's run and rollout cards, so the demo's report and the
dashboard show a decision record the same way. Unlike the report, a page loads two files of its
own origin: `/ui/static/dashboard.css` (the report's style sheet, then `web/static/dashboard.css`)
and `/ui/static/live.js` (the live rollout page). Each is pinned by its sha256 in the page's
Subresource Integrity attribute, and `CSP` forbids everything else: no inline script or style,
nothing from another origin, no framing.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from web.charts import Chart, Series, line_chart
from web.dashboard_views import EpochPoint
from web.render import CANDIDATE_COLOUR, CHAMPION_COLOUR, environment

STATIC = Path(__file__).resolve().parent / "static"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Asset:
    """A static file as served: its bytes, type and pinned digest."""

    name: str
    media_type: str
    body: bytes

    @property
    def integrity(self) -> str:
        """The Subresource Integrity value a page pins the file with."""
        return "sha256-" + base64.b64encode(hashlib.sha256(self.body).digest()).decode("ascii")

    @property
    def version(self) -> str:
        # in the URL too, so a browser's cache never pairs a new page with an old file
        return hashlib.sha256(self.body).hexdigest()[:12]


_ENVIRONMENT = environment()


def _assets() -> dict[str, Asset]:
    shared_css = _ENVIRONMENT.get_template("report.css.j2").render()
    css = shared_css + "\n" + (STATIC / "dashboard.css").read_text(encoding="utf-8")
    return {
        "dashboard.css": Asset("dashboard.css", "text/css; charset=utf-8", css.encode("utf-8")),
        "live.js": Asset("live.js", "text/javascript; charset=utf-8", (STATIC / "live.js").read_bytes()),
    }


ASSETS = _assets()
_ENVIRONMENT.globals.update(ASSETS=ASSETS)


def training_charts(training: Sequence[EpochPoint], val_metric: str) -> list[Chart]:
    """Loss per epoch (training and validation) and the validation metric per epoch."""
    labels = [str(point.epoch) for point in training]
    losses = [
        Series("train loss", CANDIDATE_COLOUR, tuple(p.train_loss for p in training)),
        Series("validation loss", CHAMPION_COLOUR, tuple(p.val_loss for p in training)),
    ]
    metric = [Series(f"validation {val_metric}", CANDIDATE_COLOUR, tuple(p.val_metric for p in training))]
    return [
        line_chart("loss per epoch", labels, losses, fmt=lambda v: f"{v:.3g}"),
        line_chart(f"validation {val_metric} per epoch", labels, metric, fmt=lambda v: f"{v:.3g}"),
    ]


_ENVIRONMENT.globals.update(training_charts=training_charts)


def render_page(template: str, **context: Any) -> str:
    """One dashboard page: `template` under templates/dashboard/, with `context` (autoescaped)."""
    return _ENVIRONMENT.get_template(f"dashboard/{template}").render(**context)
