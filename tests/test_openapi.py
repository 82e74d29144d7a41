"""The OpenAPI document (jobrunner/openapi.json) against the server's routes, docs/api.md's examples and real answers.

The document must describe exactly the routes in server.ROUTES: each documented
path, filled in with its parameters' examples, must be routed by the server's own
first-match rule to a route with that method, and every route (each shape of an
optional part, each method) must be reached by some documented path.

A small JSON Schema validator (the subset the document uses; it refuses any other
keyword, so the document cannot say something the test would silently skip) checks
docs/api.md's examples and the answers of a running server. It is stricter than the
document in one way: an object may hold only the properties its schema lists. The
document leaves objects open, so that a field added later does not break a client
generated today; the test holds the server and the docs to exactly what is documented.
"""

import importlib.resources
import itertools
import json
import re
import shlex
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from conftest import package_data

from jobrunner import server, services, store

ROOT = Path(__file__).parent.parent
API_MD = ROOT / "docs" / "api.md"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def load_document() -> dict:
    return json.loads(importlib.resources.files("jobrunner").joinpath("openapi.json").read_text())


@pytest.fixture(scope="module")
def document() -> dict:
    return load_document()


# --- a JSON Schema subset ------------------------------------------------------

ANNOTATIONS = {"description", "title", "example", "examples", "default", "deprecated", "$comment"}
ASSERTIONS = {
    "$ref", "type", "enum", "const", "properties", "required", "additionalProperties", "minProperties",
    "items", "oneOf", "anyOf", "allOf", "not", "pattern", "minLength", "maxLength", "minimum", "maximum", "format",
}
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
JSON_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


class Validator:
    """Errors of a value against a schema of the document; objects hold only the properties they list."""

    def __init__(self, document: dict):
        self.document = document

    def resolve(self, ref: str) -> dict:
        assert ref.startswith("#/"), f"only local references: {ref}"
        node = self.document
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"unresolved reference {ref}"
            node = node[part]
        return node

    def errors(self, value, schema: dict, where: str = "$", check_extra: bool = True) -> list[str]:
        unknown = set(schema) - ANNOTATIONS - ASSERTIONS
        assert not unknown, f"the test's validator does not know {sorted(unknown)} (at {where})"
        problems: list[str] = []
        if "$ref" in schema:
            problems += self.errors(value, self.resolve(schema["$ref"]), where, check_extra=False)
        for branch in schema.get("allOf", []):
            problems += self.errors(value, branch, where, check_extra=False)
        if "anyOf" in schema and all(self.errors(value, branch, where) for branch in schema["anyOf"]):
            problems.append(f"{where}: {value!r:.80} matches none of anyOf")
        if "oneOf" in schema:
            matching = sum(not self.errors(value, branch, where) for branch in schema["oneOf"])
            if matching != 1:
                details = [self.errors(value, branch, where) for branch in schema["oneOf"]]
                problems.append(f"{where}: {value!r:.80} matches {matching} of oneOf, must match 1: {details}")
        if "not" in schema and not self.errors(value, schema["not"], where):
            problems.append(f"{where}: {value!r:.80} matches what `not` refuses")
        problems += self._own_errors(value, schema, where)
        if check_extra and isinstance(value, dict):
            listed = self._listed_properties(schema)
            if listed is not None:
                problems += [f"{where}: {key!r} is not in the schema" for key in value if key not in listed]
        return problems

    def _own_errors(self, value, schema: dict, where: str) -> list[str]:
        problems = []
        types = schema.get("type")
        if types is not None and not any(JSON_TYPES[t](value) for t in ([types] if isinstance(types, str) else types)):
            return [f"{where}: {value!r:.80} is not of type {types}"]
        if "enum" in schema and value not in schema["enum"]:
            problems.append(f"{where}: {value!r:.80} is not one of {schema['enum']}")
        if "const" in schema and value != schema["const"]:
            problems.append(f"{where}: {value!r:.80} is not {schema['const']!r}")
        if isinstance(value, str):
            problems += self._string_errors(value, schema, where)
        if JSON_TYPES["number"](value):
            if "minimum" in schema and value < schema["minimum"]:
                problems.append(f"{where}: {value} < {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                problems.append(f"{where}: {value} > {schema['maximum']}")
        if isinstance(value, list) and "items" in schema:
            for index, item in enumerate(value):
                problems += self.errors(item, schema["items"], f"{where}[{index}]")
        if isinstance(value, dict):
            problems += [f"{where}: {key!r} is required" for key in schema.get("required", []) if key not in value]
            if len(value) < schema.get("minProperties", 0):
                problems.append(f"{where}: fewer than {schema['minProperties']} properties")
            for key, item in value.items():
                if key in schema.get("properties", {}):
                    problems += self.errors(item, schema["properties"][key], f"{where}.{key}")
                elif isinstance(schema.get("additionalProperties"), dict):
                    problems += self.errors(item, schema["additionalProperties"], f"{where}.{key}")
                elif schema.get("additionalProperties") is False:
                    problems.append(f"{where}: {key!r} is not allowed")
        return problems

    def _string_errors(self, value: str, schema: dict, where: str) -> list[str]:
        problems = []
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{where}: {value!r:.80} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            problems.append(f"{where}: {value!r:.80} has a length out of bounds")
        if schema.get("format") == "date-time" and not _is_rfc3339(value):
            problems.append(f"{where}: {value!r} is not an RFC 3339 date-time")
        return problems

    def _listed_properties(self, schema: dict) -> set[str] | None:
        """The properties an object may hold under this schema (its own, its $ref's and allOf's); None: no list, or open on purpose."""
        parts = [schema, *schema.get("allOf", [])]
        if "$ref" in schema:
            parts.append(self.resolve(schema["$ref"]))
        listed: set[str] = set()
        for part in parts:
            if part is not schema and ("$ref" in part or "allOf" in part):
                inner = self._listed_properties(part)
                if inner is None:
                    return None
                listed |= inner
            if "additionalProperties" in part:
                return None
            listed |= set(part.get("properties", {}))
        return listed or None


def _is_rfc3339(text: str) -> bool:
    """RFC 3339 with a zone, and a real date (Python keeps 6 fractional digits: more are cut before parsing)."""
    if not RFC3339.fullmatch(text):
        return False
    text = re.sub(r"(\.\d{6})\d+", r"\1", re.sub(r"[Zz]$", "+00:00", text)).replace("t", "T")
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def assert_valid(validator: Validator, value, schema: dict, what: str) -> None:
    problems = validator.errors(value, schema)
    assert not problems, f"{what}:\n  " + "\n  ".join(problems)


def test_the_validator_catches_what_it_claims_to(document):
    """A checker that passes everything proves nothing: each rule is seen refusing."""
    validator = Validator(document)
    job = {"id": "job_6740b44e-13b9-475d-af06-979627e0e0d6", "name": "email", "attempts": 3, "status": "cancelled",
           "created_at": "2026-11-29T00:40:00.327409Z", "data": None, "expires_at": None, "priority": 0}
    job_schema = {"$ref": "#/components/schemas/Job"}
    assert validator.errors(job, job_schema) == []
    for broken in (
        {**job, "status": "lost"},  # enum, and so no oneOf branch
        {**job, "extra": 1},  # a property the schema does not list
        {k: v for k, v in job.items() if k != "data"},  # required
        {**job, "attempts": True},  # a bool is not an integer
        {**job, "attempts": 256},  # maximum
        {**job, "created_at": "2026-11-29 00:40:00"},  # date-time
        {**job, "id": "job_6740b44e-13b9-075d-af06-979627e0e0d6"},  # pattern (version 0)
        {**job, "name": "job_x"},  # not
    ):
        assert validator.errors(broken, job_schema), broken
    error_404 = document["paths"]["/v1/jobs/{name}/{id}"]["put"]["responses"]["404"]["content"]["application/json"]["schema"]
    answer = {"title": "Job type 'x' not found", "id": "job_type_not_found", "status_code": 404, "instance": "/v1/jobs/x"}
    assert validator.errors(answer, error_404) == []
    assert validator.errors({**answer, "id": "not_found"}, error_404)  # an id this answer cannot carry
    assert validator.errors({**answer, "status_code": 400}, error_404)
    with pytest.raises(AssertionError, match="does not know"):
        validator.errors(1, {"multipleOf": 2})


# --- the document itself ---------------------------------------------------------


def operations(document: dict):
    """(path, method, operation, parameters) for every operation; parameters resolved, the path item's first."""
    validator = Validator(document)
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                operation = item[method]
                raw = [*item.get("parameters", []), *operation.get("parameters", [])]
                parameters = [validator.resolve(p["$ref"]) if "$ref" in p else p for p in raw]
                yield path, method, operation, parameters


def walk(node, where="$"):
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{where}/{index}")


def schemas_of(document: dict):
    """Every schema the document holds, where it is: components, parameters, bodies, answers."""
    for name, schema in document["components"]["schemas"].items():
        yield f"components/schemas/{name}", schema
    for where, node in walk(document):
        if "/components/schemas" in where:
            continue
        if "schema" in node and isinstance(node["schema"], dict):
            yield where, node["schema"]


def test_the_document_is_well_formed(document):
    validator = Validator(document)
    assert document["openapi"].startswith("3.1.")
    for where, node in walk(document):
        if "$ref" in node:
            validator.resolve(node["$ref"])  # raises if it points nowhere
    for where, schema in schemas_of(document):
        validator.errors(None, schema, where)  # raises on a keyword the validator would not check
    ids = [operation["operationId"] for _, _, operation, _ in operations(document)]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    schemes = document["components"]["securitySchemes"]
    for path, method, operation, parameters in operations(document):
        where = f"{method.upper()} {path}"
        templated = set(re.findall(r"\{(\w+)\}", path))
        in_path = {p["name"] for p in parameters if p["in"] == "path"}
        assert templated == in_path, f"{where}: path parameters {in_path} for the template's {templated}"
        assert all(p["required"] for p in parameters if p["in"] == "path"), where
        assert all(_examples(p, validator) for p in parameters if p["in"] == "path"), f"{where}: a path parameter without an example"
        statuses = set(operation["responses"])
        assert any(s.startswith("2") for s in statuses), f"{where}: no success answer"
        for requirement in operation.get("security", document["security"]):
            assert set(requirement) <= set(schemes), where
        for status, answer in operation["responses"].items():
            answer = validator.resolve(answer["$ref"]) if "$ref" in answer else answer
            assert answer.get("description"), f"{where} {status}: no description"
            if status.startswith(("4", "5")):
                assert "application/json" in answer["content"], f"{where} {status}: every error is JSON"


def test_the_document_is_package_data():
    """Served from the installed package: setup.cfg must ship it, or /openapi.json breaks in a wheel."""
    assert "openapi.json" in package_data()


# --- routes and entries ------------------------------------------------------------

OPTIONAL_PART = re.compile(r"\(\?:((?:[^()]|\([^()]*\))*)\)\?")  # (?:...)? holding at most one plain group


def shapes(pattern: str) -> list[str]:
    """A route's pattern with each optional part kept or left out: each shape needs its own entry (OpenAPI has no optional path parts)."""
    optional = OPTIONAL_PART.search(pattern)
    if optional is None:
        return [pattern]
    before, after = pattern[: optional.start()], pattern[optional.end() :]
    return shapes(before + optional.group(1) + after) + shapes(before + after)


def route_for(path: str):
    """(index in server.ROUTES, methods) of the route the server picks for `path`, by its own rule (Handler._route keeps no state)."""
    match, methods = server.Handler._route(None, path)
    if match is None:
        return None, {}
    return [pattern for pattern, _ in server.ROUTES].index(match.re), methods


def _examples(parameter: dict, validator: Validator) -> list:
    if "examples" in parameter:
        return [example["value"] for example in parameter["examples"].values()]
    if "example" in parameter:
        return [parameter["example"]]
    schema = parameter["schema"]
    schema = validator.resolve(schema["$ref"]) if "$ref" in schema else schema
    return [schema["example"]] if "example" in schema else []


def sample_paths(path: str, parameters: list[dict], validator: Validator) -> list[str]:
    """The path with its parameters filled in, in every combination of their examples."""
    names = re.findall(r"\{(\w+)\}", path)
    values = [next(_examples(p, validator) for p in parameters if p["name"] == name and p["in"] == "path") for name in names]
    samples = []
    for combination in itertools.product(*values):
        sample = path
        for name, value in zip(names, combination):
            sample = sample.replace("{" + name + "}", value)
        samples.append(sample)
    return samples


def test_every_route_has_an_entry_and_every_entry_a_route(document):
    validator = Validator(document)
    problems, reached = [], set()
    for path, method, _, parameters in operations(document):
        for sample in sample_paths(path, parameters, validator):
            index, methods = route_for(sample)
            if method.upper() not in methods:
                problems.append(f"{method.upper()} {path} (as {sample}) is documented, but no route in server.ROUTES answers it")
                continue
            shape = next(s for s in shapes(server.ROUTES[index][0].pattern) if re.fullmatch(s, sample))
            reached.add((index, shape, method.upper()))
    for index, (pattern, methods) in enumerate(server.ROUTES):
        for shape in shapes(pattern.pattern):
            for method, handler in methods.items():
                if (index, shape, method) not in reached:
                    problems.append(f"{method} {shape} (server.ROUTES[{index}], handle_{handler}) has no entry in jobrunner/openapi.json")
    assert not problems, "\n".join(problems)


def test_every_error_id_the_server_code_answers_is_documented(document):
    """An error id added to server.py or protocol.py without a document entry fails here."""
    validator = Validator(document)
    documented: set[tuple[int, str]] = set()
    for where, node in walk(document):
        schema = node.get("schema", {})
        for branch in schema.get("allOf", []):
            properties = branch.get("properties", {})
            if "id" in properties and "status_code" in properties:
                documented |= {(properties["status_code"]["const"], error_id) for error_id in properties["id"]["enum"]}
    other = validator.resolve("#/components/responses/OtherError")["description"]
    documented |= {(int(status), error_id) for status, error_id in re.findall(r"(\d{3}) `(\w+)`", other)}
    sources = (ROOT / "jobrunner" / "server.py").read_text() + (ROOT / "jobrunner" / "protocol.py").read_text()
    answered = {(int(status), error_id) for status, error_id in re.findall(r'HttpError\(\s*(\d{3}),\s*"(\w+)"', sources)}
    assert answered, "the pattern no longer finds the server's errors"
    assert not answered - documented, f"answered by the server, not in the document: {sorted(answered - documented)}"


# --- docs/api.md's examples ------------------------------------------------------------


@dataclass
class Example:
    command: str
    method: str
    path: str  # with the query
    body: object  # the request's JSON, or None
    status: int | None  # from an `HTTP/1.1 NNN` line
    answers: list  # the JSON lines that follow


def api_md_examples() -> list[Example]:
    """Every curl in docs/api.md's ``` blocks, with the JSON answer lines printed after it."""
    examples = []
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", API_MD.read_text(), re.M | re.S)
    for block in blocks:
        current = None
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("$ curl"):
                current = _parse_curl(line[2:])
                examples.append(current)
            elif line.startswith("HTTP/1.1 "):
                assert current is not None, f"an answer before any curl: {line}"
                current.status = int(line.split()[1])
            elif line.strip().startswith(("{", "[")):
                assert current is not None, f"a JSON example that follows no curl, so the test cannot tell what it is: {line}"
                current.answers.append(json.loads(line))
    return examples


def _parse_curl(command: str) -> Example:
    words = shlex.split(command)[1:]
    method, body, url = None, None, None
    while words:
        word = words.pop(0)
        if word in ("-u", "--user", "-H", "--header"):
            words.pop(0)
        elif word in ("-X", "--request"):
            method = words.pop(0)
        elif word in ("-d", "--data"):
            body = json.loads(words.pop(0))
        elif word.startswith("-"):
            raise AssertionError(f"the test does not know curl's {word}: {command}")
        else:
            url = word
    path = "/" + url.split("/", 1)[1] if "/" in url else "/"
    return Example(command, method or ("POST" if body is not None else "GET"), path, body, None, [])


def find_operation(document: dict, method: str, path: str):
    """(template, operation, parameters) a request goes to, or None: the template that fits, whose parameters' schemas
    accept the values if one does (a bad id still goes to its operation), the most literal first."""
    validator = Validator(document)
    fits = []
    for template, candidate_method, operation, parameters in operations(document):
        if candidate_method != method.lower():
            continue
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
        match = re.fullmatch(pattern, path)
        if match is None:
            continue
        by_name = {p["name"]: p for p in parameters if p["in"] == "path"}
        accepted = all(not validator.errors(value, by_name[name]["schema"]) for name, value in match.groupdict().items())
        fits.append(((accepted, len(re.sub(r"\{\w+\}", "", template))), template, operation, parameters))
    if not fits:
        return None
    _, template, operation, parameters = max(fits, key=lambda fit: fit[0])
    return template, operation, parameters


def success_status(operation: dict) -> int:
    [status] = [s for s in operation["responses"] if s.startswith("2")]
    return int(status)


def answer_schema(document: dict, operation: dict, status: int, media_type: str = "application/json") -> dict:
    validator = Validator(document)
    answers = operation["responses"]
    answer = answers.get(str(status)) or answers.get("default")
    assert answer is not None, f"status {status} is not documented"
    answer = validator.resolve(answer["$ref"]) if "$ref" in answer else answer
    assert media_type in answer["content"], f"status {status} is not documented as {media_type}"
    return answer["content"][media_type]["schema"]


def check_query(validator: Validator, parameters: list[dict], query: str, what: str) -> None:
    by_name = {p["name"]: p for p in parameters if p["in"] == "query"}
    for name, value in (pair.split("=", 1) for pair in query.split("&") if pair):
        assert name in by_name, f"{what}: query parameter {name!r} is not documented"
        schema = by_name[name]["schema"]
        assert_valid(validator, int(value) if schema.get("type") == "integer" else value, schema, f"{what}: ?{name}=")


def test_every_example_in_api_md_matches_the_document(document):
    validator = Validator(document)
    examples = api_md_examples()
    assert len(examples) >= 12, "the examples were not found: has docs/api.md's format changed?"
    for example in examples:
        what = f"docs/api.md: {example.command[:100]}"
        path, _, query = example.path.partition("?")
        found = find_operation(document, example.method, path)
        assert found, f"{what}: no documented operation"
        _, operation, parameters = found
        check_query(validator, parameters, query, what)
        if example.body is not None:
            assert "requestBody" in operation, f"{what}: the operation takes no body"
            assert_valid(validator, example.body, operation["requestBody"]["content"]["application/json"]["schema"], f"{what} (request)")
        status = example.status or success_status(operation)
        for answer in example.answers:
            assert_valid(validator, answer, answer_schema(document, operation, status), f"{what} ({status} answer)")


def test_the_api_md_parser_reads_requests_answers_and_statuses():
    examples = {(e.method, e.path): e for e in api_md_examples()}
    create = examples["POST", "/v1/jobs"]
    assert create.status == 201 and create.body["name"] and create.answers[0]["name"] == create.body["name"]
    assert any(e.status and e.status >= 400 for e in examples.values()), "docs/api.md shows no error answer"
    assert any(e.path.startswith("/v1/jobs/") and e.path.endswith("/replay") and e.body for e in examples.values()), "no replay with an id"


# --- a running server's answers ------------------------------------------------------------


class Checked:
    """Requests to the server under test, each answer checked against the document's entry for its operation."""

    def __init__(self, api, document: dict):
        self.api = api
        self.document = document
        self.validator = Validator(document)
        self.succeeded: set[str] = set()  # operationIds answered with a 2xx

    def request(self, method: str, path: str, body=None, status: int | None = None, **kwargs):
        response = self.api.request(method, path, body=body, **kwargs)
        what = f"{method} {path} answered {response.status}"
        if status is not None:
            assert response.status == status, f"{what}, not {status}: {response.body[:300]!r}"
        media_type = response.headers["content-type"].split(";")[0].strip()
        found = find_operation(self.document, method, path.partition("?")[0])
        if found is None:  # no such operation (405, 404): the answer any route may give
            assert_valid(self.validator, json.loads(response.body), {"$ref": "#/components/schemas/ApiError"}, what)
            return response
        _, operation, parameters = found
        if 200 <= response.status < 300:  # a refused query may be the test's point
            check_query(self.validator, parameters, path.partition("?")[2], what)
        schema = answer_schema(self.document, operation, response.status, media_type)
        if media_type == "application/json":
            assert_valid(self.validator, json.loads(response.body), schema, what)
        if 200 <= response.status < 300:
            self.succeeded.add(operation["operationId"])
        return response


def claim(db_url: str, name: str):
    conn = store.connect(db_url)
    try:
        [job] = services.claim(conn, name, limit=1).jobs
        return job
    finally:
        conn.close()


def new_id() -> str:
    return f"job_{uuid.uuid4()}"


EMAIL = {"name": "email", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 2}


def job_types(c: Checked, db_url: str) -> None:
    c.request("POST", "/v1/jobs", EMAIL, 201)
    c.request("POST", "/v1/jobs", EMAIL, 400)  # exists
    c.request("POST", "/v1/jobs", {**EMAIL, "name": "job_x"}, 400)
    c.request("POST", "/v1/jobs", {**EMAIL, "delivery_strategy": "sometimes"}, 400)
    c.request("POST", "/v1/jobs", {"name": "other"}, 400)
    c.request("POST", "/v1/jobs", b"{", 400)
    c.request("GET", "/v1/jobs", status=200)
    c.request("GET", "/v1/jobs/email", status=200)
    c.request("GET", "/v1/jobs/nope", status=404)
    c.request("POST", "/v1/jobs/email", {"attempts": 4}, 200)
    c.request("POST", "/v1/jobs/email", {}, 400)
    c.request("POST", "/v1/jobs/nope", {"concurrency": 1}, 404)
    c.request("POST", "/v1/jobs/email/pause", status=200)
    c.request("POST", "/v1/jobs/email/resume", status=200)
    c.request("POST", "/v1/jobs/email/resume", {"concurrency": 0}, 400)
    c.request("POST", "/v1/jobs/email", {"concurrency": 0}, 200)
    c.request("POST", "/v1/jobs/email/resume", status=409)
    c.request("POST", "/v1/jobs/email/resume", {"concurrency": 3}, 200)
    c.request("POST", "/v1/jobs/nope/pause", status=404)


def jobs(c: Checked, db_url: str) -> None:
    c.request("POST", "/v1/jobs", EMAIL, 201)
    c.request("POST", "/v1/jobs", {**EMAIL, "name": "sms"}, 201)
    first, second = new_id(), new_id()
    c.request("PUT", f"/v1/jobs/email/{first}", {"data": {"to": "a@example.com"}, "expires_at": None}, 202)
    c.request("PUT", f"/v1/jobs/email/{first}", {"data": "again"}, 202)  # idempotent: the stored job
    c.request("PUT", "/v1/jobs/email/random_id", {"data": None, "run_after": "2030-01-01T00:00:00+02:00"}, 202)
    c.request("PUT", f"/v1/jobs/sms/{first}", {"data": 1}, 409)
    c.request("PUT", f"/v1/jobs/nope/{second}", {"data": 1}, 404)
    c.request("PUT", f"/v1/jobs/email/{second}", {}, 400)
    c.request("PUT", f"/v1/jobs/email/{second}", {"data": 1, "run_after": "9999-12-31T23:00:00Z"}, 400)
    c.request("PUT", f"/v1/jobs/email/{second}", {"data": 1, "run_after": "tomorrow"}, 400)
    c.request("PUT", "/v1/jobs/email/job_nope", {"data": 1}, 400)
    c.request("PUT", f"/v1/jobs/email/{second}", {"data": "x" * 110_000}, 413)
    c.request("GET", f"/v1/jobs/{first}", status=200)
    c.request("GET", f"/v1/jobs/{second}", status=404)
    c.request("GET", f"/v1/jobs/email/{first}", status=200)
    c.request("GET", f"/v1/jobs/sms/{first}", status=404)
    c.request("GET", "/v1/jobs/email/random_id", status=400)
    c.request("GET", "/v1/jobs/email/jobs?limit=1", status=200)
    c.request("GET", "/v1/jobs/email/jobs?status=lost", status=400)
    c.request("GET", "/v1/jobs/nope/jobs", status=404)

    sent = claim(db_url, "email")  # the one due: `first`
    path = f"/v1/jobs/email/{sent.job_id}"
    c.request("POST", f"{path}/cancel", status=409)
    c.request("POST", path, {"status": "failed", "attempt": sent.attempts}, 200)  # queued again
    c.request("POST", path, {"status": "failed", "attempt": sent.attempts}, 400)  # stale
    c.request("POST", path, {"status": "done", "attempt": 1}, 400)
    c.request("POST", path, {"status": "succeeded"}, 400)
    c.request("POST", path, {"status": "succeeded", "attempt": 1}, 200)  # archived
    c.request("POST", path, {"status": "succeeded", "attempt": 1}, 400)  # duplicate
    c.request("GET", path, status=200)

    c.request("PUT", f"/v1/jobs/email/{first}", {"data": 1}, 400)  # an archived id
    c.request("POST", f"/v1/jobs/email/{first}/cancel", status=400)
    c.request("PUT", f"/v1/jobs/email/{second}", {"data": 2}, 202)
    c.request("POST", f"/v1/jobs/sms/{second}/cancel", status=404)
    c.request("POST", f"/v1/jobs/email/{second}/cancel", status=200)
    c.request("GET", "/v1/jobs/email/jobs", status=200)


def replay(c: Checked, db_url: str) -> None:
    c.request("POST", "/v1/jobs", EMAIL, 201)
    job = new_id()
    c.request("PUT", f"/v1/jobs/email/{job}", {"data": [1, 2]}, 202)
    c.request("POST", f"/v1/jobs/email/{job}/replay", status=400)  # still queued
    c.request("POST", f"/v1/jobs/email/{job}/cancel", status=200)
    c.request("POST", f"/v1/jobs/email/{job}/replay", status=201)
    c.request("POST", f"/v1/jobs/{job}/replay", {}, 201)
    chosen = new_id()
    first = c.request("POST", f"/v1/jobs/{job}/replay", {"id": chosen}, 201)
    again = c.request("POST", f"/v1/jobs/email/{job}/replay", {"id": chosen}, 201)
    assert first.json["id"] == again.json["id"] == chosen
    c.request("POST", f"/v1/jobs/email/{job}/replay", {"id": job}, 409)  # the replayed job's own id
    c.request("POST", f"/v1/jobs/email/{job}/replay", {"id": "job_nope"}, 400)
    c.request("POST", f"/v1/jobs/email/{job}/replay", [1], 400)
    c.request("POST", f"/v1/jobs/email/{new_id()}/replay", status=404)
    c.request("POST", f"/v1/jobs/{new_id()}/replay", status=404)


def heartbeats(c: Checked, db_url: str) -> None:
    c.request("POST", "/v1/jobs", EMAIL, 201)
    job = new_id()
    c.request("PUT", f"/v1/jobs/email/{job}", {"data": 1}, 202)
    path = f"/v1/jobs/email/{job}/heartbeat"
    c.request("POST", path, {"attempt": 3}, 400)  # queued, not sent
    sent = claim(db_url, "email")
    c.request("POST", path, {"attempt": sent.attempts}, 200)
    c.request("POST", path, {"attempt": sent.attempts, "extend": 3600}, 200)
    c.request("POST", path, {"attempt": sent.attempts, "extend": 0}, 400)
    c.request("POST", path, {"attempt": sent.attempts, "extend": "soon"}, 400)
    c.request("POST", path, {"attempt": sent.attempts, "lease": 5}, 400)
    c.request("POST", path, {}, 400)
    c.request("POST", path, {"attempt": sent.attempts + 1}, 400)  # stale
    c.request("POST", f"/v1/jobs/sms/{job}/heartbeat", {"attempt": sent.attempts}, 404)
    c.request("POST", f"/v1/jobs/email/{new_id()}/heartbeat", {"attempt": 1}, 404)
    c.request("POST", f"/v1/jobs/email/{job}", {"status": "succeeded", "attempt": sent.attempts}, 200)
    c.request("POST", path, {"attempt": sent.attempts}, 400)  # archived


def schedules(c: Checked, db_url: str) -> None:
    c.request("POST", "/v1/jobs", EMAIL, 201)
    nightly = {"name": "nightly", "job_type": "email", "cron": "0 2 * * *", "time_zone": "Europe/Berlin", "data": {"report": "daily"}}
    c.request("POST", "/v1/schedules", nightly, 201)
    c.request("POST", "/v1/schedules", nightly, 409)
    c.request("POST", "/v1/schedules", {**nightly, "name": "other", "time_zone": "Mars/Olympus"}, 400)
    c.request("POST", "/v1/schedules", {**nightly, "name": "other", "job_type": "nope"}, 400)
    c.request("POST", "/v1/schedules", {"name": "every-minute", "job_type": "email", "interval_seconds": 60, "expires_after": 30, "config_owned": True}, 201)
    c.request("POST", "/v1/schedules", b"[", 400)
    c.request("GET", "/v1/schedules", status=200)
    c.request("GET", "/v1/schedules/nightly", status=200)
    c.request("GET", "/v1/schedules/nope", status=404)
    c.request("POST", "/v1/schedules/nightly", {"misfire": "all", "misfire_limit": 10}, 200)
    c.request("POST", "/v1/schedules/nightly", {"interval_seconds": 0}, 400)
    c.request("POST", "/v1/schedules/nope", {"paused": True}, 404)
    c.request("POST", "/v1/schedules/nightly/pause", status=200)
    c.request("POST", "/v1/schedules/nightly/resume", status=200)
    c.request("POST", "/v1/schedules/nightly/run", status=201)
    c.request("GET", "/v1/schedules/nightly", status=200)  # with its last job
    c.request("POST", "/v1/schedules/nope/run", status=404)
    c.request("DELETE", "/v1/schedules/nightly", status=200)
    c.request("DELETE", "/v1/schedules/nightly", status=404)


def operations_routes(c: Checked, db_url: str) -> None:
    c.request("GET", "/", status=200)
    c.request("GET", "/healthz", status=200, auth=None)
    c.request("GET", "/metrics", status=200)
    c.request("GET", "/v1/jobs", status=401, auth=None)
    c.request("GET", "/v1/jobs", status=401, auth=("", "x"))
    c.request("GET", "/v1/jobs", status=403, headers={"X-Forwarded-Proto": "http"})
    c.request("GET", "/healthz", status=403, auth=None, headers={"X-Forwarded-Proto": "http"})
    c.request("POST", "/v1/jobs", EMAIL, 403, headers={"Sec-Fetch-Site": "cross-site"})
    c.request("PUT", "/v1/jobs", status=405)
    c.request("POST", "/v1/jobs", b"2\r\n{}\r\n0\r\n\r\n", 411, headers={"Transfer-Encoding": "chunked"})
    c.request("POST", "/v1/jobs", b"{" + b" " * 300_000 + b"}", 413)


def this_document(c: Checked, db_url: str) -> None:
    """Public, like /healthz: it describes the API and holds no data, and client generators fetch it without credentials."""
    for auth in (None, ("admin", "s3cret:pass")):
        answer = c.request("GET", "/openapi.json", status=200, auth=auth)
        assert json.loads(answer.body) == c.document


# Each scenario, on a fresh database, must answer every operation it names with a success.
SCENARIOS = {
    "job types": (job_types, {"createJobType", "listJobTypes", "getJobTypeOrJob", "updateJobType", "pauseJobType", "resumeJobType"}),
    "jobs": (jobs, {"enqueue", "getJobTypeOrJob", "getJob", "listJobs", "recordStatus", "cancelJob"}),
    "replay": (replay, {"replayJob", "replayJobById"}),
    "heartbeats": (heartbeats, {"heartbeat"}),
    "schedules": (
        schedules,
        {"createSchedule", "listSchedules", "getSchedule", "updateSchedule", "deleteSchedule", "pauseSchedule", "resumeSchedule", "runSchedule"},
    ),
    "operations": (operations_routes, {"dashboard", "health", "metrics"}),
    "this document": (this_document, {"openapi"}),
}


def test_the_scenarios_reach_every_documented_operation(document):
    documented = {operation["operationId"] for _, _, operation, _ in operations(document)}
    reached = set().union(*(names for _, names in SCENARIOS.values()))
    assert reached == documented, f"not reached: {sorted(documented - reached)}; not documented: {sorted(reached - documented)}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_real_server_answers_as_documented(scenario, api, document, db_url):
    run, names = SCENARIOS[scenario]
    checked = Checked(api, document)
    run(checked, db_url)
    assert names <= checked.succeeded, f"no success answered for {sorted(names - checked.succeeded)}"
