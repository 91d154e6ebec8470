"""Bad input and failing teachers: OpenAI-shaped errors with the right status, nothing lost."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.testing.teacher_server import TeacherServer
from tests.conftest import make_settings
from tests.servers import GatewayServer


def post(gateway: GatewayServer, content: bytes | str, **headers: str) -> httpx.Response:
    return httpx.post(
        gateway.base_url + "/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


def assert_error_shape(response: httpx.Response, status: int, error_type: str) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type
    assert "Traceback" not in response.text
    return body["error"]  # type: ignore[no-any-return]


def test_invalid_json(gateway: GatewayServer) -> None:
    error = assert_error_shape(post(gateway, b"{not json"), 400, "invalid_request_error")
    assert "not valid JSON" in error["message"]


def test_body_not_an_object(gateway: GatewayServer) -> None:
    assert_error_shape(post(gateway, b"[1, 2]"), 400, "invalid_request_error")


def test_missing_messages_names_the_param(gateway: GatewayServer) -> None:
    error = assert_error_shape(
        post(gateway, '{"model": "support-intents"}'), 400, "invalid_request_error"
    )
    assert error["param"] == "messages"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "support-intents", "messages": [], "temperature": 1}', "messages"),
        (
            '{"model": "support-intents", "messages": [{"role": "user", "content": "x"}], '
            '"temperature": "hot"}',
            "temperature",
        ),
        (
            '{"model": "support-intents", "messages": [{"role": "wizard", "content": "x"}]}',
            "messages[0].role",
        ),
        ('{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (
            '{"model": "support-intents", "messages": [{"role": "user", "content": "x"}], '
            '"max_tokens": -3}',
            "max_tokens",
        ),
    ],
)
def test_wrongly_typed_fields_name_the_param(gateway: GatewayServer, body: str, param: str) -> None:
    error = assert_error_shape(post(gateway, body), 400, "invalid_request_error")
    assert error["param"] == param
    assert param.split(".")[0].split("[")[0] in error["message"]


def test_sdk_sees_bad_request(gateway: GatewayServer) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="support-intents",
            messages=[],  # type: ignore[arg-type]
        )
    assert info.value.status_code == 400


def test_body_over_limit_is_413(tmp_path: Path, teacher: TeacherServer) -> None:
    settings = make_settings(tmp_path, teacher, server={"max_body_bytes": 1000})
    with GatewayServer(create_app(settings)) as gateway:
        big = '{"model": "support-intents", "messages": [{"role": "user", "content": "%s"}]}' % (
            "x" * 2000
        )
        error = assert_error_shape(post(gateway, big), 413, "invalid_request_error")
        assert "1000" in error["message"]

        # chunked upload without Content-Length is cut off too
        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(5):
                yield b"x" * 500

        response = httpx.post(gateway.base_url + "/chat/completions", content=chunks())
        assert_error_shape(response, 413, "invalid_request_error")
    assert len(teacher.requests) == 0


def test_unknown_model_without_default_teacher_is_404(
    tmp_path: Path, teacher: TeacherServer
) -> None:
    settings = make_settings(
        tmp_path,
        teacher,
        default_teacher=None,
        tasks={
            "support-intents": {
                "plugin": "classify",
                "teacher": {
                    "model": "openai/teacher-model",
                    "api_base": teacher.url,
                    "api_key": "k",
                },
            }
        },
    )
    with GatewayServer(create_app(settings)) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            )
        assert info.value.code == "model_not_found"
        assert info.value.param == "model"  # type: ignore[attr-defined]
        ok = client.chat.completions.create(
            model="support-intents", messages=[{"role": "user", "content": "x"}]
        )
        assert ok.choices[0].message.content == "echo: x"


def test_unknown_route_is_openai_shaped_404(gateway: GatewayServer) -> None:
    assert_error_shape(httpx.get(gateway.url + "/v1/nothing"), 404, "invalid_request_error")


def test_teacher_retried_then_succeeds(gateway: GatewayServer, teacher: TeacherServer) -> None:
    teacher.fail_next(1, status=500)
    response = post(
        gateway, '{"model": "support-intents", "messages": [{"role": "user", "content": "again"}]}'
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: again"


def test_teacher_failing_after_retries_is_502_with_upstream_message(
    gateway: GatewayServer, teacher: TeacherServer
) -> None:
    teacher.fail_next(10, status=503, message="the teacher is on fire")
    response = post(
        gateway, '{"model": "support-intents", "messages": [{"role": "user", "content": "x"}]}'
    )
    error = assert_error_shape(response, 502, "upstream_error")
    assert "the teacher is on fire" in error["message"]
    assert "2 attempt" in error["message"]  # num_retries: 1 in the test settings
    store = gateway.app.state.runtime.store
    assert store.flush(10)
    row = store.fetch()[0]
    assert row["status"] == 502 and "on fire" in row["error"]


def test_fallback_teacher_answers_when_primary_fails(
    tmp_path: Path, teacher: TeacherServer
) -> None:
    with TeacherServer(responder=lambda body: "card_linking") as backup:
        settings = make_settings(
            tmp_path,
            teacher,
            default_teacher={
                "model": "openai/teacher-model",
                "api_base": teacher.url,
                "api_key": "k",
                "num_retries": 0,
                "fallbacks": [
                    {
                        "model": "openai/backup-model",
                        "api_base": backup.url,
                        "api_key": "k2",
                        "num_retries": 0,
                    }
                ],
            },
        )
        teacher.fail_next(1, status=500)
        with GatewayServer(create_app(settings)) as gateway:
            response = post(
                gateway,
                '{"model": "support-intents", "messages": '
                '[{"role": "user", "content": "link my card"}]}',
            )
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == "card_linking"
            store = gateway.app.state.runtime.store
            assert store.flush(10)
            row = store.fetch()[0]
            assert row["teacher_model"] == "openai/backup-model"
            assert row["target"] == "card_linking"
        assert backup.requests[-1]["model"] == "backup-model"


def test_teacher_timeout_is_504(tmp_path: Path, teacher: TeacherServer) -> None:
    settings = make_settings(
        tmp_path,
        teacher,
        default_teacher={
            "model": "openai/teacher-model",
            "api_base": teacher.url,
            "api_key": "k",
            "timeout_s": 0.3,
            "num_retries": 1,
        },
    )
    teacher.hang_next(5)
    with GatewayServer(create_app(settings)) as gateway:
        response = post(
            gateway, '{"model": "support-intents", "messages": [{"role": "user", "content": "x"}]}'
        )
        error = assert_error_shape(response, 504, "timeout")
        assert "did not answer in time" in error["message"]


def test_teacher_rejecting_the_request_is_400(
    gateway: GatewayServer, teacher: TeacherServer
) -> None:
    teacher.fail_next(1, status=400, message="max_tokens is too large")
    response = post(
        gateway, '{"model": "support-intents", "messages": [{"role": "user", "content": "x"}]}'
    )
    error = assert_error_shape(response, 400, "invalid_request_error")
    assert "max_tokens is too large" in error["message"]
    assert len(teacher.requests) == 1  # a bad request is not retried


def test_streaming_error_before_first_chunk_is_plain_http_error(
    gateway: GatewayServer, teacher: TeacherServer
) -> None:
    teacher.fail_next(10, status=500)
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        list(
            client.chat.completions.create(
                model="support-intents", stream=True, messages=[{"role": "user", "content": "x"}]
            )
        )
    assert info.value.status_code == 502


def test_api_keys_never_logged(
    tmp_path: Path, teacher: TeacherServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(
        tmp_path,
        teacher,
        default_teacher={
            "model": "openai/teacher-model",
            "api_base": teacher.url,
            "api_key": "sk-very-secret-123",
            "num_retries": 1,
        },
    )
    teacher.fail_next(10, status=401, message="bad key")
    with GatewayServer(create_app(settings)) as gateway:
        response = post(
            gateway,
            '{"model": "support-intents", "messages": [{"role": "user", "content": "x"}]}',
            authorization="Bearer client-secret-456",
        )
        assert response.status_code == 502
        assert "sk-very-secret-123" not in response.text
    assert caplog.records, "expected the failures to be logged"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "sk-very-secret-123" not in logged
    assert "client-secret-456" not in logged
    assert "sk-very-secret-123" not in repr(settings)
