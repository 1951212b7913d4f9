"""One test item per case file: `pytest parity -m 8gpu` (items, ids and markers come from parity.plugin)."""

import pytest

from parity.plugin import run_and_judge
from parity.session import verdict_passed


def test_case(parity_case, request):
    verdict, message = run_and_judge(parity_case, request.config)
    if not verdict_passed(verdict):
        pytest.fail(message, pytrace=False)
