"""The browser dashboard served by the control plane at ``/`` (docs/dashboard.md).

Server-rendered HTML (Jinja2) with inline SVG charts drawn on the server, one small stylesheet and one small
script; no front-end build. Pages: fleet overview, rollouts, devices, models. Sign-in with an operator API token
(an HttpOnly cookie); viewers get no buttons at all.
"""

from edgefleet.controlplane.dashboard.pages import router

__all__ = ["router"]
