"""
Tests of nanochat/dataset.py: the shard downloader against a local HTTP server with scripted faults,
the train/val split and row-group striding of the readers, and the offline local corpus
(deterministic, >= 10M chars, val held out).
"""

import glob
import hashlib
import os
import re
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset

CLIMBMIX_VAL = "shard_06542.parquet"

def shard_bytes(texts, row_group_size=2):
    """A small parquet shard in the hosted format, as bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=row_group_size, compression="zstd")
    return sink.getvalue().to_pybytes()

@pytest.fixture
def served(http_server, base_dir, monkeypatch):
    """Shards 0..2 and the ClimbMix val shard on the local server; downloads retry without waiting."""
    monkeypatch.setenv("NANOCHAT_DATA_URL", http_server.url)
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    monkeypatch.setattr(dataset, "DOWNLOAD_BACKOFF", 0.0)
    for name in ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", CLIMBMIX_VAL]:
        # ~200 KB of incompressible-ish text, so a "cut" really ends mid-body
        http_server.routes["/" + name] = shard_bytes([name + " " + os.urandom(50_000).hex() for _ in range(2)])
    return http_server

def data_dir_files(base_dir, name="base_data_climbmix"):
    return sorted(os.listdir(base_dir / name))

# -----------------------------------------------------------------------------
# Downloader

def test_download_success_fetches_train_and_val(served, base_dir, capsys):
    dataset.main(["-n", "2", "-w", "2"])
    assert data_dir_files(base_dir) == ["shard_00000.parquet", "shard_00001.parquet", CLIMBMIX_VAL]
    for name in data_dir_files(base_dir):
        assert (base_dir / "base_data_climbmix" / name).read_bytes() == served.routes["/" + name]
    assert "/shard_00002.parquet" not in served.hits
    assert "Downloaded: 3/3" in capsys.readouterr().out

def test_val_shard_always_fetched(served, base_dir):
    assert dataset.download_shards(0, "climbmix", num_workers=1) == []
    assert data_dir_files(base_dir) == [CLIMBMIX_VAL]
    assert served.hits == {"/" + CLIMBMIX_VAL: 1}

def test_retry_after_http_500(served, base_dir):
    served.faults["/shard_00000.parquet"] = ["500"]
    assert dataset.download_shards(1, "climbmix", num_workers=2) == []
    assert served.hits["/shard_00000.parquet"] == 2
    assert (base_dir / "base_data_climbmix/shard_00000.parquet").read_bytes() == served.routes["/shard_00000.parquet"]

def test_cut_connection_leaves_no_partial_file_then_succeeds(served, base_dir):
    served.faults["/shard_00001.parquet"] = ["cut"]
    assert dataset.download_shards(2, "climbmix", num_workers=2) == []
    assert served.hits["/shard_00001.parquet"] == 2
    assert (base_dir / "base_data_climbmix/shard_00001.parquet").read_bytes() == served.routes["/shard_00001.parquet"]
    assert data_dir_files(base_dir) == ["shard_00000.parquet", "shard_00001.parquet", CLIMBMIX_VAL]  # no .tmp left

def test_persistent_failure_exits_nonzero_naming_shard(served, base_dir, capsys):
    served.faults["/shard_00001.parquet"] = ["cut"] * dataset.DOWNLOAD_ATTEMPTS
    with pytest.raises(SystemExit) as exc:
        dataset.main(["-n", "2", "-w", "2"])
    assert exc.value.code != 0 and "shard_00001.parquet" in str(exc.value.code)
    assert "Downloaded: 2/3" in capsys.readouterr().out
    assert served.hits["/shard_00001.parquet"] == dataset.DOWNLOAD_ATTEMPTS
    assert data_dir_files(base_dir) == ["shard_00000.parquet", CLIMBMIX_VAL]  # nothing at the failed path, no temp file
    # the same command again fetches only the missing shard
    dataset.main(["-n", "2", "-w", "2"])
    assert [served.hits[f"/shard_0000{i}.parquet"] for i in (0, 1)] == [1, dataset.DOWNLOAD_ATTEMPTS + 1]

def test_present_files_are_skipped(served, base_dir, capsys):
    d = base_dir / "base_data_climbmix"
    d.mkdir()
    for name in ["shard_00000.parquet", "shard_00001.parquet", CLIMBMIX_VAL]:
        (d / name).write_bytes(b"already here")
    dataset.main(["-n", "2"])
    assert served.hits == {}
    assert (d / "shard_00000.parquet").read_bytes() == b"already here"
    assert "Downloaded: 3/3" in capsys.readouterr().out

def test_env_selects_fineweb_edu(served, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATASET", "fineweb-edu")
    served.routes["/shard_01822.parquet"] = shard_bytes(["fineweb val doc"])
    assert dataset.download_shards(1) == []
    assert data_dir_files(base_dir, "base_data_fineweb_edu") == ["shard_00000.parquet", "shard_01822.parquet"]
    assert dataset.list_parquet_files("val") == [str(base_dir / "base_data_fineweb_edu" / "shard_01822.parquet")]

# -----------------------------------------------------------------------------
# Readers

@pytest.fixture
def climbmix_shards(base_dir, monkeypatch):
    """Train shards 0 (5 docs) and 1 (3 docs), the val shard, in row groups of 2, plus a stray temp file."""
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    d = base_dir / "base_data_climbmix"
    d.mkdir()
    (d / "shard_00000.parquet").write_bytes(shard_bytes(["a0", "a1", "a2", "a3", "a4"]))
    (d / "shard_00001.parquet").write_bytes(shard_bytes(["b0", "b1", "b2"]))
    (d / CLIMBMIX_VAL).write_bytes(shard_bytes(["v0", "v1", "v2"]))
    (d / "shard_00002.parquet.tmp123").write_bytes(b"half a download")
    return d

def test_reader_splits_exclude_val(climbmix_shards):
    d = str(climbmix_shards)
    train = [f"{d}/shard_00000.parquet", f"{d}/shard_00001.parquet"]
    assert dataset.list_parquet_files("train") == train
    assert dataset.list_parquet_files("val") == [f"{d}/{CLIMBMIX_VAL}"]
    assert dataset.list_parquet_files() == train + [f"{d}/{CLIMBMIX_VAL}"]

def test_row_group_striding(climbmix_shards):
    # shard 0 row groups: [a0 a1] [a2 a3] [a4]; shard 1: [b0 b1] [b2]
    assert list(dataset.parquets_iter_batched("train")) == [["a0", "a1"], ["a2", "a3"], ["a4"], ["b0", "b1"], ["b2"]]
    assert list(dataset.parquets_iter_batched("train", start=0, step=2)) == [["a0", "a1"], ["a4"], ["b0", "b1"]]
    assert list(dataset.parquets_iter_batched("train", start=1, step=2)) == [["a2", "a3"], ["b2"]]
    assert list(dataset.parquets_iter_batched("val", start=1, step=2)) == [["v2"]]
    path = dataset.list_parquet_files("train")[0]
    assert dataset.num_row_groups(path) == 3 and dataset.read_row_group(path, 1) == ["a2", "a3"]

def test_missing_data_errors_name_the_command(base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    with pytest.raises(FileNotFoundError, match=r"python -m nanochat\.dataset -n 8 --dataset climbmix"):
        dataset.list_parquet_files("train")
    d = base_dir / "base_data_climbmix"
    d.mkdir()
    (d / "shard_00000.parquet").write_bytes(shard_bytes(["x"]))
    with pytest.raises(FileNotFoundError, match=r"shard_06542\.parquet .*python -m nanochat\.dataset -n 0"):
        dataset.list_parquet_files("val")
    os.remove(d / "shard_00000.parquet")
    (d / CLIMBMIX_VAL).write_bytes(shard_bytes(["x"]))
    with pytest.raises(FileNotFoundError, match="no train shards"):
        dataset.list_parquet_files("train")
    with pytest.raises(FileNotFoundError, match=r"python -m nanochat\.dataset --dataset local"):
        dataset.list_parquet_files("train", dataset="local")
    monkeypatch.setenv("NANOCHAT_DATASET", "fineweb")
    with pytest.raises(ValueError, match="fineweb-edu"):
        dataset.get_data_dir()

# -----------------------------------------------------------------------------
# Local corpus

def test_split_doc_hand_worked():
    text = "aaaaa\n\nbbbbb\n\n" + "c" * 12 + "\n\n" + "d" * 25
    assert dataset.split_doc(text, max_chars=12) == ["aaaaa\n\nbbbbb", "c" * 12, "d" * 12, "d" * 12, "d"]

def shard_digests(base_dir):
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(str(base_dir / "base_data_local" / "*")))}

def test_local_corpus_is_deterministic_and_idempotent(base_dir, capsys):
    root = os.path.join(sysconfig.get_paths()["stdlib"], "email")
    digest = dataset.build_local_corpus(root=root)
    first = shard_digests(base_dir)
    assert list(first) == [f"shard_{i:05d}.parquet" for i in range(dataset.LOCAL_NUM_SHARDS)]
    assert dataset.build_local_corpus(force=True, root=root) == digest
    assert shard_digests(base_dir) == first
    mtime = os.path.getmtime(base_dir / "base_data_local" / "shard_00000.parquet")
    assert dataset.build_local_corpus(root=root) is None  # already built: skipped
    assert os.path.getmtime(base_dir / "base_data_local" / "shard_00000.parquet") == mtime
    assert "already built" in capsys.readouterr().out
    shards = [pq.read_table(base_dir / "base_data_local" / f"shard_{i:05d}.parquet")["text"].to_pylist()
              for i in range(dataset.LOCAL_NUM_SHARDS)]
    docs = [t for shard in shards for t in shard]
    assert len(docs) == len(set(docs)), "documents are deduplicated"
    assert all(dataset.MIN_DOC_CHARS <= len(t) <= dataset.MAX_DOC_CHARS for t in docs)
    assert any("def " in t for t in docs)
    # the hash is of the shuffled documents, dealt round-robin into the shards
    dealt = [shards[i % dataset.LOCAL_NUM_SHARDS][i // dataset.LOCAL_NUM_SHARDS] for i in range(len(docs))]
    assert dataset.corpus_hash(dealt) == digest

def test_full_local_corpus(base_dir, monkeypatch, capsys):
    """The real build (a few s of CPU): the stdlib only, >= 6M chars (7.7M on Python 3.11), the same sha256 when
    built again, the pinned val shard held out, hosted format."""
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    with monkeypatch.context() as m:  # a machine with nothing in site-packages
        m.setattr(sysconfig, "get_paths",
                  lambda real=sysconfig.get_paths: dict(real(), purelib="/nonexistent", platlib="/nonexistent"))
        dataset.main(["--dataset", "local"])
    first = re.search(r"local corpus sha256 ([0-9a-f]{64}) \(Python ", capsys.readouterr().out).group(1)
    train, val = dataset.list_parquet_files("train"), dataset.list_parquet_files("val")
    assert len(train) == dataset.LOCAL_NUM_SHARDS - 1 and val[0].endswith(f"{dataset.LOCAL_NUM_SHARDS - 1:05d}.parquet")
    train_docs = [t for batch in dataset.parquets_iter_batched("train") for t in batch]
    val_docs = [t for batch in dataset.parquets_iter_batched("val") for t in batch]
    total = sum(map(len, train_docs)) + sum(map(len, val_docs))
    assert total >= 6_000_000, f"local corpus has only {total:,} chars"
    assert not set(train_docs) & set(val_docs)
    assert any('The "assert" statement' in t for t in train_docs + val_docs), "pydoc's language reference topics are in"
    pf = pq.ParquetFile(val[0])
    assert pf.schema_arrow.names == ["text"] and pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert all(pf.metadata.row_group(i).num_rows <= 1024 for i in range(pf.num_row_groups))
    dataset.main(["--dataset", "local", "--force"])
    assert re.search(r"local corpus sha256 ([0-9a-f]{64})", capsys.readouterr().out).group(1) == first
    with pytest.raises(SystemExit):
        dataset.main(["--dataset", "local", "-n", "3"])  # -n means nothing for the local corpus
