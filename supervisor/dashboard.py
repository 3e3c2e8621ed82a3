"""The live dashboard at ``GET /supervisor/``: one self-contained page, no CDN, no build step.

The page (``static/dashboard.html``) polls ``/supervisor/instances``, ``/supervisor/events``
and ``/supervisor/messages?state=dead`` and draws them with DOM calls (no HTML from data). The
admin token for the requeue buttons is typed into the page and kept in a JavaScript variable
only. A Content-Security-Policy allows exactly the page's own inline script and style (by
hash) and requests to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

PAGE = "dashboard.html"


def _hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions for the inline ``<tag>`` blocks of ``html``."""
    out = []
    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL):
        digest = hashlib.sha256(body.encode("utf-8")).digest()
        out.append(f"'sha256-{base64.b64encode(digest).decode('ascii')}'")
    return out


def content_security_policy(html: str) -> str:
    """A policy allowing only the page's own inline script and style, and same-origin fetches."""
    return "; ".join((
        "default-src 'none'",
        "script-src " + " ".join(_hashes(html, "script")),
        "style-src " + " ".join(_hashes(html, "style")),
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ))


def load_page() -> str:
    """The dashboard page shipped in the package."""
    return resources.files("supervisor").joinpath("static", PAGE).read_text(encoding="utf-8")


class Dashboard:
    """Serves the page (read once)."""

    def __init__(self) -> None:
        self.html = load_page()
        self.csp = content_security_policy(self.html)

    def add_routes(self, app: web.Application) -> None:
        """``GET /supervisor/`` (the page) and ``GET /supervisor`` (a redirect to it)."""
        app.router.add_get("/supervisor/", self.page)
        app.router.add_get("/supervisor", self.redirect)

    async def page(self, request: web.Request) -> web.Response:
        """The page itself; its data comes from the JSON routes."""
        return web.Response(text=self.html, content_type="text/html", charset="utf-8", headers={
            "Content-Security-Policy": self.csp,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })

    async def redirect(self, request: web.Request) -> web.Response:
        """``/supervisor`` → ``/supervisor/`` (relative, so a path prefix is kept)."""
        raise web.HTTPFound("supervisor/")
