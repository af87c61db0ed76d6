import pytest

from vllm_kvplug.models import ensure_smollm2


@pytest.fixture(scope="session")
def smollm2_path():
    return ensure_smollm2()
