"""schemathesis against the served OpenAPI document of a live server: valid and invalid
requests generated from the document's own schemas get no 5xx, only documented statuses
and content types, bodies that match the documented response schemas, and a 4xx for every
request the document calls invalid. The server is small (context 32, four prompts, four
choices) so that every generated request is cheap, and the examples per operation are
bounded so that the run takes seconds.

The cases are drawn with `APIOperation.as_strategy` under hypothesis (schemathesis's
pytest plugin needs a pytest older than this project's).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server_helpers import LiveServer, engine_config, make_checkpoint  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]
EXAMPLES = 20  # per operation and generation mode
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("GET", "/v1/models"), ("GET", "/v1/models/{model}"), ("POST", "/tokenize"),
              ("POST", "/detokenize"), ("GET", "/tokenizer_info"), ("GET", "/health"),
              ("GET", "/version"), ("GET", "/metrics")]
# invalid requests exist only where there is a body to get wrong
CASES = [(m, p, "positive") for m, p in OPERATIONS] + [
    (m, p, "negative") for m, p in OPERATIONS if m == "POST"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("server-schemathesis"))
    config = engine_config(max_model_len=32, max_num_seqs=4)
    with LiveServer(checkpoint, config, max_prompts=4, request_timeout=30) as live:
        yield live


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_every_route_is_fuzzed(api):
    served = {(method.upper(), path) for path, item in api.raw_schema["paths"].items()
              for method in item}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES,
                         ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_the_served_document_describes_the_server(api, server, method, path, mode):
    operation = api[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)

    run()
    server.wait_idle()
