"""generate_stream refuses settings it cannot use before loading anything (issue 17 item 9)."""

from __future__ import annotations

import math

import pytest

import linearize


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=""), "prompt='': must be non-empty text"),
    (dict(prompt=" \n"), "prompt=' \\n': must be non-empty text"),
    (dict(num_beams=0), "num_beams=0: must be an integer >= 1"),
    (dict(num_beams=True), "num_beams=True: must be an integer >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens=0: must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature=-1.0: must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature=nan: must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p=0.0: must be a number in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5: must be a number in (0, 1]"),
])
def test_bad_generation_settings_are_refused_before_loading(kwargs, message):
    kwargs = {"prompt": "hi", **kwargs}
    # the source does not exist: the settings must be refused before it is looked up
    with pytest.raises(ValueError) as err:
        next(linearize.generate_stream("/nonexistent/model", **kwargs))
    assert str(err.value).startswith(message), str(err.value)
