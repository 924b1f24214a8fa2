import pytest

from data_helpers import episodes, write


@pytest.fixture(scope="session")
def lerobot_ds(tmp_path_factory):
    """(root, episodes): 3 episodes x 40 frames, two cameras of different sizes, 2 episodes per file."""
    eps = episodes(0)
    return write(tmp_path_factory.mktemp("lerobot") / "ds", eps), eps
