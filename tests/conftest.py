"""Shared fixtures: the five tiny families of the zoo, built once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models():
    from flashc import zoo
    from flashc_testing import FAMILIES

    return {name: zoo.build(name, seed=0) for name in FAMILIES}
