import pytest

from align_jax.data.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()
