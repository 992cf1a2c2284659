"""Real stand-ins for remote services, served on 127.0.0.1 for the test suite (no SDK mocks)."""

from tests.fakes.cms_server import FakeGhostServer as FakeGhostServer
from tests.fakes.crm_server import FakeCrmServer as FakeCrmServer
from tests.fakes.openai_server import (
    FakeOpenAIServer,
    Fault,
    RecordedRequest,
    Responder,
    ResponderResult,
    ScriptedResponder,
    count_tokens,
    minimal_instance,
    prompt_tokens_for,
    schema_responder,
)
from tests.fakes.payments_server import FakePaymentsServer as FakePaymentsServer

__all__ = [
    "FakeOpenAIServer",
    "Fault",
    "RecordedRequest",
    "Responder",
    "ResponderResult",
    "ScriptedResponder",
    "count_tokens",
    "minimal_instance",
    "prompt_tokens_for",
    "schema_responder",
]
