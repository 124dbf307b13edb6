"""A property-based fuzz of the whole HTTP API from its own OpenAPI schema (schemathesis): every operation of /api
and /v1, each generated request sent without the API key and with it. No answer may be a 5xx or contradict the
schema (status code, content type, body).

`make test` runs it with 40 examples per operation (about 1,000 requests, a quarter of a minute on 2 cores);
`make fuzz` with 250 (about 6,500 requests). Figures in benchmarks/RESULTS.md.
"""

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("faiss")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from clipdalle.serve import ServeSettings, create_app, load_models  # noqa: E402

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SENT: dict[str, int] = {}  # operation -> requests sent
STATUSES: dict[int, int] = {}  # status -> answers


@pytest.fixture(scope="module")
def fuzz_app(built_index, tiny_runs, tmp_path_factory):
    models = load_models(index=built_index, dalle=tiny_runs[1])
    thumbnails = tmp_path_factory.mktemp("thumbnails")
    # Small limits keep generated generation requests fast; rerank 1 keeps /v1 sampling to n images.
    limits = dict(max_n=4, max_keep=4, rerank=1, max_k=20, thumbnail_dir=str(thumbnails), max_queue=64)
    yield create_app(models, ServeSettings(api_key=KEY, **limits))
    models.close()
    total = sum(SENT.values())
    print(f"\nfuzz: {total} requests over {len(SENT)} operations, {EXAMPLES} examples each (with and without the key)")
    print(f"fuzz: answers by status {dict(sorted(STATUSES.items()))}")


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app, headers={"Host": "localhost"})


def test_every_operation_answers_within_its_schema(fuzz_schema):
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) >= 13  # every /api and /v1 route is in the schema

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same requests on every run: a failure is reproducible
            database=None,
        )
        def fuzz(case):
            for headers in ({"Host": "localhost"}, {"Host": "localhost", "Authorization": f"Bearer {KEY}"}):
                response = case.call_and_validate(headers=headers, checks=CHECKS)
                SENT[case.operation.label] = SENT.get(case.operation.label, 0) + 1
                STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1
                if "Authorization" not in headers and not case.path.startswith("/v1/images/files/"):
                    assert response.status_code == 401, (case.operation.label, response.status_code)

        fuzz()
    assert len(SENT) == len(operations)
