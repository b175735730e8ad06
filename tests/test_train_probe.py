"""scripts/train_probe.py cannot break silently: its tiny CPU run trains, checks and exports a checkpoint that
transformers and star-mcore both load, with a tokenizer that counts as the generators count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from train_probe import BPE, curriculum  # noqa: E402

from star_mcore.eval.tasks import TASKS  # noqa: E402


def test_tiny_run_exports_an_hf_checkpoint(probe_tiny):
    out, stdout = probe_tiny
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "probe_train.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "probe_train.json").read_text())
    assert summary["step"] == 3 and len(summary["log"]) == 3
    assert set(summary["final_niah"]) == {"niah_single_1@512", "niah_single_2@512", "niah_single_3@512"}
    assert "final single-NIAH score" in stdout

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from star_mcore.model.arch import LlamaArch

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    arch = LlamaArch.from_hf_dir(out)
    assert arch.eos_token_ids == [2] and arch.max_position_embeddings >= 32768 and arch.rope_theta == 500000.0
    hf, bpe = AutoTokenizer.from_pretrained(out, local_files_only=True), BPE(out)
    s = TASKS["niah_single_2"].make(0, 0, 300, bpe)
    assert hf.encode(s.context, add_special_tokens=False) == bpe.encode(s.context, False)
    assert arch.vocab_size == len(bpe) and hf.bos_token_id == bpe.bos


def test_curriculum_unlocks_longer_contexts_over_time():
    import random

    rng = random.Random(0)
    lengths = [512, 1024, 2048, 4096, 8192]
    assert {curriculum(0.0, lengths, rng) for _ in range(50)} == {512}
    assert max(curriculum(0.3, lengths, rng) for _ in range(50)) == 2048
    late = [curriculum(0.9, lengths, rng) for _ in range(400)]
    assert set(late) == set(lengths) and late.count(8192) > 200
