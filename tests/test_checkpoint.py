import numpy as np
import pytest

from comind.checkpoint import CheckpointStore
from comind.tensors import Layout

ARRAYS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7], np.int64)]
LAYOUT = Layout.of(ARRAYS, ["dense/kernel", "step"])


def test_save_and_resume_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for round in range(4):
        store.save(round, LAYOUT, LAYOUT.pack([ARRAYS[0] + round, ARRAYS[1]]))
    assert store.rounds() == [2, 3]
    latest = store.latest()
    assert latest.round == 3 and [s.name for s in latest.layout.specs] == ["dense/kernel", "step"]
    np.testing.assert_array_equal(latest.layout.views(latest.packed)[0], ARRAYS[0] + 3)
    with np.load(store.path(3), allow_pickle=False) as plain:  # readable with NumPy alone
        np.testing.assert_array_equal(plain["tensor_00001"], [7])


def test_round_never_goes_backwards(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(5, LAYOUT, LAYOUT.pack(ARRAYS))
    with pytest.raises(ValueError, match="never goes backwards"):
        store.save(4, LAYOUT, LAYOUT.pack(ARRAYS))


def test_unreadable_newest_falls_back_and_leftovers_are_cleared(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, LAYOUT, LAYOUT.pack(ARRAYS))
    store.path(2).write_bytes(b"not a zip")
    (tmp_path / "round-000000003.tmp.npz").write_bytes(b"half written")
    store = CheckpointStore(tmp_path)
    assert not list(tmp_path.glob("*.tmp.npz"))
    assert store.latest().round == 1


def test_empty_directory_has_no_checkpoint(tmp_path):
    assert CheckpointStore(tmp_path / "new").latest() is None


def test_a_directory_whose_checkpoints_are_all_unreadable_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    store.path(11).write_bytes(b"not a zip")
    store.path(12).write_bytes(b"nor this")
    with pytest.raises(ValueError, match=rf"None of the 2 checkpoints in {tmp_path} is readable .* move them away "
                                         rf"to start training again from round 0\. Received: rounds 11 to 12"):
        store.latest()


def test_a_directory_that_cannot_be_written_is_refused_at_once(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"Cannot write checkpoints to .*a-file/checkpoints .* set "
                                         r"COMIND_CHECKPOINT_DIR to a directory this process may write"):
        CheckpointStore(tmp_path / "a-file" / "checkpoints")
