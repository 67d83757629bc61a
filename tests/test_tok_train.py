"""
scripts/tok_train.py over an existing tokenizer: the same flags keep it (what lets runs/speedrun.sh be run again);
a tokenizer that checkpoints were trained with is replaced only with --overwrite (else they would stop loading).
"""

import json
import os
import subprocess
import sys

from nanochat.checkpoint import save_checkpoint
from nanochat.tokenizer import Tokenizer
from conftest import REPO, make_pretraining_dir

def tok_train(base, *flags):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATASET="local", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max-chars=20000", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)

def test_existing_tokenizer_is_kept_or_guarded(tmp_path, tiny_tokenizer):
    make_pretraining_dir(tmp_path, tiny_tokenizer)
    first = tok_train(tmp_path, "--vocab-size=300")
    assert first.returncode == 0, first.stderr[-2000:]
    tokenizer = Tokenizer.from_directory(str(tmp_path / "tokenizer"))
    assert tokenizer.get_vocab_size() == 300
    token_bytes = tmp_path / "tokenizer" / "token_bytes.pt"
    expected = token_bytes.read_bytes()
    token_bytes.unlink()  # what the damaged-file error says to do: delete it and rerun
    again = tok_train(tmp_path, "--vocab-size=300")
    assert again.returncode == 0 and "was trained with these flags on local: kept" in again.stdout, again.stderr
    assert token_bytes.read_bytes() == expected

    # a checkpoint trained with it: other flags must not replace it...
    ckpt_dir = tmp_path / "base_checkpoints" / "d2"
    save_checkpoint(str(ckpt_dir), 5, {}, None, {"tokenizer_fingerprint": tokenizer.fingerprint()})
    other = tok_train(tmp_path, "--vocab-size=310")
    assert other.returncode != 0
    assert f"the checkpoints in {ckpt_dir} were trained with" in other.stderr and "--overwrite" in other.stderr
    assert Tokenizer.from_directory(str(tmp_path / "tokenizer")).fingerprint() == tokenizer.fingerprint()
    # ...unless asked to
    forced = tok_train(tmp_path, "--vocab-size=310", "--overwrite")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert Tokenizer.from_directory(str(tmp_path / "tokenizer")).get_vocab_size() == 310
    record = json.loads((tmp_path / "tokenizer" / "tok_train.json").read_text())
    assert record["vocab_size"] == 310 and record["dataset"] == "local"
