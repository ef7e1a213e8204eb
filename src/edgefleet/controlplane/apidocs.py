"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) from assets shipped in the package, never a CDN: a control plane
often runs where the browser reaching it has no internet, and a page that loads its script from a CDN is blank
there. The scripts and the stylesheet are the dashboard's static files (``/static/{name}``, public); their
licenses sit beside them in ``static/third-party/``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

__all__ = ["ASSETS", "router"]

# the files the two pages load, all served by the dashboard's /static/{name}
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")
# no favicon request at all: FastAPI's default points at its own web site
_NO_ICON = "data:,"

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    # behind a proxy that mounts the server under a prefix, every URL the page loads carries it
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}/static/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static/swagger-ui.css",
        swagger_favicon_url=_NO_ICON,
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        # validatorUrl: Swagger UI would otherwise send the document to validator.swagger.io for a badge
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/docs/oauth2-redirect")
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}/static/redoc.standalone.js",
        redoc_favicon_url=_NO_ICON,
        with_google_fonts=False,
    )
