"""common.json_values: the one JSON-plain rule of checkpoint records (strict) and reports (NaN -> null)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import plain as checkpoint_plain
from common.errors import InputError
from common.handlers import jsonable as handlers_jsonable
from common.intensity import XRAY2CT
from common.json_values import jsonable, plain

CASES = [  # value, plain (records), jsonable (reports)
    ((1, 2.5), [1, 2.5], [1, 2.5]),
    ({3: np.float32(0.5)}, {"3": 0.5}, {"3": 0.5}),
    (np.arange(3, dtype=np.int16), [0, 1, 2], [0, 1, 2]),
    (torch.tensor([[1.0, float("nan")]]), [[1.0, math.nan]], [[1.0, None]]),
    (np.float64("inf"), math.inf, None),
    (torch.device("cpu"), "cpu", "cpu"),
    (torch.float32, "torch.float32", "torch.float32"),
    (Path("/a/b"), "/a/b", "/a/b"),
    (XRAY2CT, XRAY2CT.as_dict(), XRAY2CT.as_dict()),
    (None, None, None),
    (True, True, True),
]


def _same(a, b) -> bool:  # NaN == NaN here
    return json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize("value, record, report", CASES)
def test_plain_and_jsonable(value, record, report):
    assert _same(plain(value), record)
    assert _same(jsonable(value), report)
    json.dumps(jsonable(value), allow_nan=False)  # reports are strict JSON


def test_old_homes_are_the_same_functions():
    assert checkpoint_plain is plain and handlers_jsonable is jsonable


def test_unknown_types_are_refused_in_records_and_passed_in_reports():
    thing = object()
    with pytest.raises(InputError, match="cannot record a value of type object"):
        plain({"a": [thing]})
    assert jsonable({"a": [thing]}) == {"a": [thing]}
