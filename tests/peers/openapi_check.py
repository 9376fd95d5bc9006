"""Checks control-API exchanges recorded against a running spanvmm (tests/api_spec.rs) with
openapi-core, a maintained OpenAPI 3 validator: every request must be one docs/api.yaml
accepts, every response must match what it documents for that status (body schema and
content type), and every documented operation must have been exercised.

usage: openapi_check.py SPEC EXCHANGES.json

EXCHANGES.json: [{"method", "path" (with any query), "body" (text), "status",
"content_type", "response" (text)}, ...]. Prints one line per problem; exit status 1 if any.
"""

import json
import sys
from urllib.parse import parse_qsl

import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse


def main() -> int:
    spec_path, exchanges_path = sys.argv[1], sys.argv[2]
    api = OpenAPI.from_file_path(spec_path)
    with open(spec_path) as f:
        raw = yaml.safe_load(f)
    documented = {
        (path, method.upper())
        for path, ops in raw["paths"].items()
        for method in ops
        if method in ("get", "put", "post", "delete", "patch")
    }
    with open(exchanges_path) as f:
        exchanges = json.load(f)
    problems = []
    seen = set()
    for e in exchanges:
        path, _, query = e["path"].partition("?")
        what = f'{e["method"]} {e["path"]} -> {e["status"]}'
        seen.add((path, e["method"]))
        body = e["body"].encode() if e["body"] else None
        req = MockRequest(
            "http://localhost",
            e["method"],
            path,
            args=dict(parse_qsl(query, keep_blank_values=True)),
            data=body,
            content_type="application/json",
        )
        try:
            api.validate_request(req)
        except Exception as err:  # noqa: BLE001 - report every kind of refusal
            problems.append(f"{what}: request not accepted by the spec: {err!r} {cause(err)}")
        resp = MockResponse(
            e["response"].encode(),
            status_code=e["status"],
            content_type=e["content_type"].split(";")[0].strip(),
        )
        try:
            api.validate_response(req, resp)
        except Exception as err:  # noqa: BLE001
            problems.append(
                f"{what}: response does not match the spec: {err!r} {cause(err)}\n"
                f"    body: {e['response'][:300]}"
            )
    for path, method in sorted(documented - seen):
        problems.append(f"{method} {path}: documented but not exercised")
    for p in problems:
        print(p)
    print(f"{len(exchanges)} exchanges, {len(documented)} documented operations, "
          f"{len(problems)} problems")
    return 1 if problems else 0


def cause(err: BaseException) -> str:
    """The schema errors openapi-core wraps (the useful part of its message)."""
    out = []
    e = err
    while e is not None:
        details = getattr(e, "schema_errors", None)
        if details:
            out += [f"[{'/'.join(map(str, d.path))}: {d.message}]" for d in details]
        e = e.__cause__
    return " ".join(out)


if __name__ == "__main__":
    sys.exit(main())
