"""The service's request rules that need no running service: a batch's all-or-nothing, the frame contract."""

from __future__ import annotations

import asyncio

import pytest

from components.config import load_params
from components.serving.service import all_or_nothing, frame_problem
from tests.conftest import REPO_ROOT


def test_a_failed_answer_is_raised_only_once_every_other_has_ended() -> None:
    """A batch whose one image gets 503 must not return while the others are still being recorded."""
    ended: list[int] = []

    async def answer(index: int, delay: float) -> int:
        await asyncio.sleep(delay)
        if index == 0:
            raise TimeoutError("image 0 waited past the latency budget")
        ended.append(index)
        return index

    with pytest.raises(TimeoutError, match="image 0"):
        asyncio.run(all_or_nothing(answer(i, d) for i, d in enumerate((0.0, 0.05, 0.1))))
    assert ended == [1, 2]
    assert asyncio.run(all_or_nothing(answer(i, 0.01 * (3 - i)) for i in (1, 2, 3))) == [1, 2, 3]


def test_a_frame_bound_set_for_one_side_only_is_named_not_a_crash() -> None:
    limits = load_params(REPO_ROOT / "params.yaml").validate_
    one_sided = limits.model_copy(update={"width": limits.width.model_copy(update={"min": 100}),
                                          "height": limits.height.model_copy(update={"min": None})})
    problem = frame_problem({"width": 10, "height": 100, "contrast": 50.0}, one_sided)
    assert problem.startswith("10x100 px is below the smallest frame the data contract allows (100xany, ")
    assert frame_problem({"width": 100, "height": 1, "contrast": 50.0}, one_sided) is None
