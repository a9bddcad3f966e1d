"""Fixtures shared by the launcher tests."""
import pytest


@pytest.fixture
def out(tmp_path):
    """An empty folder where rank scripts write their records (``TEST_OUT_DIR``)."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder
