"""Fixtures shared by the training tests."""

import pytest

from training.judge import JudgeConfig, train_judge


@pytest.fixture(scope="session")
def trusted_judge():
    """The attribute judge, trained once per session: test_judge checks it, test_ldm_quality judges with it.

    Smaller than the default (16000 scenes x 3 epochs, ~21 s of CPU), about 20 s on one thread; it still has to
    clear the same 98% bar on 1000 held-out renders.
    """
    return train_judge(JudgeConfig(n_train=10000, epochs=2, n_eval=1000, seed=5))
