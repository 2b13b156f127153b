"""The published API description: a valid OpenAPI 3.1 document of every route the app serves."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from openapi_spec_validator import validate
from referencing import Registry, Resource

from agent.api.openapi import openapi_document
from agent.api.routes import add_routes
from agent.deployment_request import deployment_request_schema, parse_deployment_request
from agent.errors import NotFound, ValidationFailed
from agent.models import Deployment, DeploymentSpec, new_deployment_id, utc_now
from agent.specs import BuildSpec, RunSpec


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(openapi_document())


def schema_of(document: dict[str, Any], name: str) -> jsonschema.protocols.Validator:
    """A validator of components.schemas[name] that resolves the document's own $refs."""
    contents = {**document, "$schema": jsonschema.Draft202012Validator.META_SCHEMA["$id"]}
    registry = Registry().with_resource("urn:api", Resource.from_contents(contents))
    return jsonschema.Draft202012Validator({"$ref": f"urn:api#/components/schemas/{name}"}, registry=registry)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_route_the_app_serves_is_documented_and_nothing_else(document: dict[str, Any]) -> None:
    app = web.Application()
    add_routes(app)
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (path, method) for path, item in document["paths"].items() for method in item if method != "parameters"
    }
    assert served == documented


def test_the_request_schema_is_the_one_that_validates_requests(document: dict[str, Any]) -> None:
    published = document["components"]["schemas"]
    validating = deployment_request_schema()
    assert published["DeploymentRequest"]["properties"].keys() == validating["properties"].keys()
    for name in validating["$defs"]:
        assert published[name]["properties"].keys() == validating["$defs"][name]["properties"].keys()
    example = document["paths"]["/v1/deployments"]["post"]["requestBody"]["content"]["application/json"]["example"]
    schema_of(document, "DeploymentRequest").validate(example)
    # ... and the example is a request the agent accepts.
    assert parse_deployment_request(example).application == example["application"]


def test_every_operation_documents_its_errors_in_the_envelope(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters" or path == "/v1/openapi.json":
                continue
            errors = {status for status in operation["responses"] if status.startswith(("4", "5"))}
            assert "503" in errors, (path, method)
            for status in errors:
                content = operation["responses"][status]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/Error"}
            if operation.get("security") != []:
                assert {"401", "403"} <= errors, (path, method)


def test_responses_of_the_agent_match_their_schemas(document: dict[str, Any]) -> None:
    now = utc_now()
    spec = DeploymentSpec(
        application="web",
        build=BuildSpec(image="local/busybox", command=("true",), env={"SECRET": "x"}),
        run=RunSpec(command=("httpd",), port=8080),
        metadata={"commit": "abc"},
    )
    deployment = Deployment(
        id=new_deployment_id(), application="web", server="local", status="failed", created_at=now,
        updated_at=now, log_path="/tmp/x.log", spec=spec, error={"type": "build_failed", "message": "exit 1"},
        exit_code=1,
    )
    schema_of(document, "Deployment").validate(deployment.to_json())
    schema_of(document, "Error").validate(NotFound("deployment dep_x not found").to_envelope())
    invalid = ValidationFailed([{"field": "application", "message": "is required"}]).to_envelope()
    schema_of(document, "Error").validate(invalid)
    with pytest.raises(jsonschema.ValidationError):
        schema_of(document, "Error").validate({**invalid, "extra": 1})
