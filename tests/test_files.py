"""files.py: what reaches the disk where a filesystem or Windows syncs otherwise than a local Linux disk."""

import errno
import fcntl
import json
import os
import stat

import pytest

from eagle_gto import files
from eagle_gto.evaluation.questions import sort_answers
from eagle_gto.train.checkpoints import checkpoint_path, complete_checkpoint, read_progress


def refusing_folder_syncs(code, synced):
    """os.fsync of a filesystem whose folders answer `code` (EINVAL on an SMB share), recording the files synced."""
    fsync = os.fsync

    def spied(descriptor):
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(code, os.strerror(code))
        synced.append(os.fstat(descriptor).st_size)
        fsync(descriptor)

    return spied


def test_a_filesystem_without_folder_syncs_still_takes_checkpoints_and_sorted_answers(tmp_path, monkeypatch):
    """An SMB/CIFS share (or WSL's drvfs, some network filesystems) answers a folder's fsync with EINVAL: every
    checkpoint, and every answer file's final sort, failed there once the weights and answers were written."""
    synced = []
    monkeypatch.setattr(os, "fsync", refusing_folder_syncs(errno.EINVAL, synced))
    checkpoint = checkpoint_path(tmp_path, 2)
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"w" * 7)
    complete_checkpoint(tmp_path, checkpoint, {"step": 2}, keep=2)
    assert read_progress(checkpoint, 2) == {"step": 2}
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i}) + "\n" for i in (2, 1)))
    sort_answers(answers)
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [1, 2]
    assert synced[0] == 7 and len(synced) == 3  # the weights, progress.json and the sorted answers: still synced


def test_a_folder_sync_that_fails_otherwise_is_still_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", refusing_folder_syncs(errno.EIO, []))
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        files.sync_folder(tmp_path)


def test_windows_syncs_each_file_through_a_descriptor_open_for_writing(tmp_path, monkeypatch):
    """Windows' fsync (the C runtime's _commit) refuses a file opened for reading only (EBADF): every checkpoint
    failed there. Stood in for here: its fsync's rule, and no folder syncs (os.name stays, for pathlib)."""
    fsync, synced = os.fsync, []

    def windows_fsync(descriptor):
        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        synced.append(os.fstat(descriptor).st_size)
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    monkeypatch.setattr(files, "POSIX", False, raising=False)
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"w" * 7)
    (tmp_path / "optimizer" / "state.pt").write_bytes(b"s" * 5)
    files.sync_files(tmp_path)
    assert synced == [7, 5]
    assert (tmp_path / "model.safetensors").read_bytes() == b"w" * 7  # (opened for writing, not rewritten)


def test_every_folder_opened_to_be_synced_is_closed_again(tmp_path, monkeypatch):
    """A checkpoint syncs each of its folders and every answer sort its folder: a descriptor left open each time
    (also where the sync fails) would run a long run out of them."""
    opened, closed = [], []
    real_open, real_close = os.open, os.close
    monkeypatch.setattr(os, "open", lambda *args, **kwargs: opened.append(real_open(*args, **kwargs)) or opened[-1])
    monkeypatch.setattr(os, "close", lambda descriptor: closed.append(descriptor) or real_close(descriptor))
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "state.pt").write_bytes(b"s")
    files.sync_files(tmp_path)
    files.write_atomically(tmp_path / "progress.json", "{}\n")
    monkeypatch.setattr(os, "fsync", refusing_folder_syncs(errno.EIO, []))
    with pytest.raises(OSError):
        files.sync_folder(tmp_path)
    assert len(opened) == 4 and sorted(closed) == sorted(opened)
