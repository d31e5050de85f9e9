"""What a replica generates for a resumed request (``resume_choices``): the listed choices,
each from its prompt plus the tokens its client has, with what is left of its budget."""

from __future__ import annotations

import pytest

from cluster.errors import InvalidRequestError
from deployments.llm_server.deployment import Choice, resume_choices
from engine.types import SamplingParams


def test_a_fresh_request_runs_every_choice_from_the_prompt():
    params = [SamplingParams(max_tokens=9), SamplingParams(max_tokens=9, seed=2)]
    assert resume_choices([5, 6], params, None) == [Choice(0, [5, 6], params[0]), Choice(1, [5, 6], params[1])]


def test_a_resumption_appends_the_sent_tokens_and_shortens_the_budget():
    params = [SamplingParams(max_tokens=10, min_tokens=4)] * 3
    got = resume_choices([5, 6], params, {2: [7, 8, 9], 1: []})
    assert [(c.index, c.prompt_ids, c.resumed) for c in got] == [(1, [5, 6], 0), (2, [5, 6, 7, 8, 9], 3)]
    assert (got[0].params.max_tokens, got[0].params.min_tokens) == (10, 4)
    assert (got[1].params.max_tokens, got[1].params.min_tokens) == (7, 1)


@pytest.mark.parametrize("resume, words", [({3: [1]}, "choice 3"), ({0: [1, 2]}, "finished")])
def test_a_resume_state_that_cannot_be_resumed_is_a_400(resume, words):
    with pytest.raises(InvalidRequestError, match=words):
        resume_choices([5], [SamplingParams(max_tokens=2)], resume)
