import pytest


@pytest.fixture(scope="module")
def openpi_client():
    """The unmodified openpi client (a test dependency): our server must be wire-compatible with it."""
    try:
        import openpi_client.msgpack_numpy  # noqa: F401
        import openpi_client.websocket_client_policy  # noqa: F401
    except ImportError as e:
        pytest.fail(f"openpi-client is not installed ({e}): pip install --no-deps openpi-client==0.1.2 (it pins "
                    "numpy<2 in its metadata but runs on numpy 2)")
    return openpi_client
