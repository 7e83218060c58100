"""The FastAPI side of the server: the app object, OpenAI error bodies, request bodies, the API key,
and the OpenAPI document (/openapi.json, with Swagger UI at /docs).

Routes live on the deployment class (app.py) and its tokenization mixin (tokenization.py); both
register on `api` here. Request bodies are read by hand (`read_body`: a size bound, UTF-8, JSON,
strict pydantic validation, each failure a 4xx naming the field), so FastAPI does not see them: each
route declares its body model with `body_doc(Model)` and `openapi()` adds the models' schemas, the
bearer-key scheme (required on every route but /health, /version and the docs when the server has a
key), and the error body of 4xx/5xx answers.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtnlg_ray import __version__
from mtnlg_ray.serve.responses import ErrorResponse, error_body
from mtnlg_ray.serve.schemas import describe_error

log = logging.getLogger(__name__)
PUBLIC_ROUTES = {"/health", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect"}  # never need the key
BEARER = "bearerAuth"


class APIError(Exception):
    """An HTTP error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return JSONResponse(error_body(self.message, kind, self.param, self.code), self.status, headers=self.headers)


api = FastAPI(title="mtnlg OpenAI-compatible API", version=__version__, docs_url="/docs", redoc_url=None,
              openapi_url="/openapi.json",
              description="OpenAI's completions and chat completions, vLLM's tokenization routes, on Ray Serve.")
_docs = {"key_required": False}  # this process's server has a key (set by the replica: `document_key`)


def document_key(required: bool) -> None:
    """Whether the OpenAPI document marks the bearer key required. A function, not a field of `api`:
    Serve pickles the deployment class by value, and the `api` it carries is a copy of this module's."""
    _docs["key_required"] = required
    api.openapi_schema = None


@api.exception_handler(APIError)
async def _api_error(request, exc: APIError):
    return exc.response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError):
    return APIError(400, str(exc.errors()[0].get("msg")), code="invalid_value").response()


@api.exception_handler(Exception)
async def _bug(request, exc: Exception):  # not a user mistake: still an OpenAI body, and logged
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()


def validation_error(err: ValidationError) -> APIError:
    param, message = describe_error(err)
    return APIError(400, message, param=param, code="invalid_value")


def check_api_key(request: Request, key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (no key set: every request passes)."""
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def read_body(request: Request, model_cls: type[BaseModel], limit: int) -> Any:
    """Bound the size, decode UTF-8 and JSON, validate: each failure a clear 4xx."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise APIError(400, f"request body is not valid UTF-8 (byte {err.start})", code="invalid_encoding")
    except json.JSONDecodeError as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json")
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


# ------------------------------------------------------------------------------------- OpenAPI
_BODIES: dict[str, type[BaseModel]] = {}  # schema name -> request model, filled by body_doc


def body_doc(model_cls: type[BaseModel]) -> dict:
    """A route's `openapi_extra`: its JSON request body is `model_cls` (read by `read_body`)."""
    _BODIES[model_cls.__name__] = model_cls
    ref = {"$ref": f"#/components/schemas/{model_cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openapi() -> dict:
    if api.openapi_schema:
        return api.openapi_schema
    doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model_cls in [*_BODIES.values(), ErrorResponse]:
        schema = model_cls.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model_cls.__name__] = schema
    components["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer",
                                              "description": "the server's API key (mtnlg serve --api-key)"}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, ops in doc.get("paths", {}).items():
        for op in ops.values():
            op.setdefault("responses", {}).pop("422", None)  # FastAPI's default; our errors are OpenAI bodies
            op["responses"].update({"400": {"description": "a bad field (`param` names it)", **error},
                                    "503": {"description": "overloaded (Retry-After) or engine down", **error}})
            if path not in PUBLIC_ROUTES:
                op["responses"]["401"] = {"description": "invalid or missing API key", **error}
                op["security"] = [{BEARER: []}] if _docs["key_required"] else [{BEARER: []}, {}]
    api.openapi_schema = doc
    return doc


api.openapi = openapi
