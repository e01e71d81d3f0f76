"""The restricted unpickler: every array a text encoder's output is stored as loads; nothing else runs."""

import codecs
import pickle

import numpy as np
import pytest
import torch

from dit import safe_pickle
from tests.tiny_data import Calls, RunsCodeThenReturnsArray, RunsCommand, StorageRunsCommand, deflate_bomb


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize(
    "value",
    [
        np.arange(6, dtype=np.float16).reshape(2, 3),
        np.ones((3, 8), np.float32),
        np.zeros((1, 4), np.float64),
        torch.arange(6.0).reshape(3, 2),
        torch.ones(2, 8, dtype=torch.bfloat16),
        [np.ones(2), {"a": (1, 2.0, "x")}],
    ],
    ids=["np16", "np32", "np64", "torch32", "torch_bf16", "containers"],
)
def test_arrays_tensors_and_plain_containers_load_as_plain_pickle_does(value, protocol):
    payload = pickle.dumps(value, protocol=protocol)
    loaded, expected = safe_pickle.loads(payload), pickle.loads(payload)
    if isinstance(expected, list):
        assert np.array_equal(loaded[0], expected[0]) and loaded[1] == expected[1]
    elif isinstance(expected, torch.Tensor):
        assert loaded.dtype == expected.dtype and torch.equal(loaded, expected)
    else:
        assert loaded.dtype == expected.dtype and np.array_equal(loaded, expected)


def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path):
    for payload, name in (
        (pickle.dumps(RunsCommand(f"touch {tmp_path / 'a'}")), "posix.system"),
        (pickle.dumps(RunsCodeThenReturnsArray(tmp_path / "b")), "builtins.eval"),
        (pickle.dumps(Exception("not an array")), "builtins.Exception"),
    ):
        with pytest.raises(safe_pickle.UnsafePickle) as e:
            safe_pickle.loads(payload)
        assert e.value.name == name
    with pytest.raises(pickle.UnpicklingError):  # torch's weights_only load refuses the command inside the storage
        safe_pickle.loads(pickle.dumps(StorageRunsCommand(f"touch {tmp_path / 'c'}")))
    assert list(tmp_path.iterdir()) == []


def test_globals_are_admitted_by_name_never_by_module(tmp_path):
    """numpy's testing helper runstring calls exec: numpy is admitted for two names, not as a module."""
    from numpy.testing._private.utils import runstring

    code = f"__import__('pathlib').Path({str(tmp_path / 'ran')!r}).touch()"
    with pytest.raises(safe_pickle.UnsafePickle) as e:
        safe_pickle.loads(pickle.dumps(Calls(runstring, code, {})))
    assert e.value.name == "numpy.testing._private.utils.runstring"
    assert list(tmp_path.iterdir()) == []
    pickle.loads(pickle.dumps(Calls(runstring, code, {})))  # what plain pickle would have done
    assert list(tmp_path.iterdir()) == [tmp_path / "ran"]


def test_codecs_other_than_latin1_are_refused_before_they_run():
    """Protocol 2 writes bytes as _codecs.encode(text, 'latin1'); punycode of 8000 characters takes minutes."""
    assert safe_pickle.loads(pickle.dumps(b"\x00\xff", protocol=2)) == b"\x00\xff"
    with pytest.raises(safe_pickle.UnsafePickle, match="punycode"):
        safe_pickle.loads(pickle.dumps(Calls(codecs.encode, "\u00e9" * 8000, "punycode")))


def test_a_storage_that_declares_more_than_it_holds_is_refused_before_it_is_inflated():
    with pytest.raises(safe_pickle.DeclaredTooLarge, match="declares 16777216 bytes in a payload of"):
        safe_pickle.loads(deflate_bomb(16))
