"""Schemathesis fuzzes every operation of the served OpenAPI schema: no input makes the server answer 5xx."""
import pytest

pytest.importorskip("fastapi")
try:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
except ImportError as e:  # an optional test dependency
    pytest.skip(f"schemathesis is not installed ({e.name})", allow_module_level=True)

from serve_support import ThreadServer, lively_model  # noqa: E402

from zhllm.infer.engine import Engine  # noqa: E402
from zhllm.serve.app import create_app  # noqa: E402

KEY = "sk-fuzz"
EXAMPLES = 10  # per operation: bounded, so the module takes seconds


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    engine = Engine.load(lively_model(tmp_path_factory, tokenizer_dir), device="cpu", dtype="float32")
    s = ThreadServer(create_app(engine, api_key=KEY, max_batch=4, max_queue=64, max_tokens=8))
    yield s
    s.close()


def test_no_input_makes_a_server_error(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    failures = []
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            for headers in ({"Authorization": f"Bearer {KEY}"}, {}):
                response = case.call(base_url=server.url, headers=headers, timeout=30)
                if response.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path} -> {response.status_code}: "
                                    f"{case.body!r:.200} {response.text[:200]}")
        fuzz()
    assert not failures, "\n".join(failures[:5])

