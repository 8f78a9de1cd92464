import pytest

from tests.helpers.backend_checks import CPU_BACKENDS


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """The backend table: every backend that takes CPU tensors in this process (``reference`` always, ``cpu``
    when the C++ extension is built, ``triton`` under ``TRITON_INTERPRET=1``); ``LPC_TEST_BACKENDS=reference,cpu``
    narrows it."""
    return request.param
