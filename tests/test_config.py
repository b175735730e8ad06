"""The typed config: YAML + overrides, refusals with the key's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from star_mcore.config import load_config, to_yaml
from star_mcore.errors import ConfigError

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml")
REQUIRED = ["checkpoint.hf_path=/ckpt", "inference.input_path=in.jsonl", "inference.output_path=out.jsonl"]


def test_yaml_plus_overrides():
    cfg = load_config(DEMO, REQUIRED + ["inference.context_parallel_mode=ring", "model.context_parallel_size=2"])
    assert cfg.inference.context_parallel_mode == "ring"
    assert cfg.model.context_parallel_size == 2
    assert cfg.trainer.accelerator == "cpu" and cfg.model.precision == "fp32"
    assert "context_parallel_mode: ring" in to_yaml(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["inference.anchor_size=2048", "inference.block_size=1024"],
     "inference.anchor_size (2048) must be <= inference.block_size (1024); "
     "a longer anchor is inference.star_context=long_anchor"),
    (["inference.anchor_size=2048", "inference.block_size=1024", "inference.star_context=anchor+previous"],
     "inference.anchor_size (2048) must be <= inference.block_size (1024)"),
    (["inference.star_context=window"],
     "inference.star_context must be one of anchor, long_anchor, anchor+previous, anchor+landmarks, got 'window'"),
    (["inference.star_context=anchor+previous", "inference.anchor_mode=recompute"],
     "inference.star_context=anchor+previous needs inference.anchor_mode=shared"),
    (["inference.landmarks=0"], "inference.landmarks must be >= 1, got 0"),
    (["inference.landmark_size=-1"], "inference.landmark_size must be >= 1, got -1"),
    (["inference.block_size=0"], "inference.block_size must be > 0, got 0"),
    (["inference.context_parallel_mode=tree"],
     "inference.context_parallel_mode must be one of star, ring, none, got 'tree'"),
    (["model.precision=fp8"], "model.precision must be one of fp32, bf16, fp16, got 'fp8'"),
    (["model.transformer_impl=te"], "model.transformer_impl must be one of local, transformer_engine, got 'te'"),
    (["model.transformer_impl=transformer_engine"],  # demo_cpu.yaml: trainer.accelerator=cpu
     "model.transformer_impl=transformer_engine runs on GPUs only (TransformerEngine's layers)"),
    (["inference.context_parallel_mode=none"], "set model.context_parallel_size=1 (got 4)"),
    (["inference.tokens_to_generate=0"], "inference.tokens_to_generate must be >= 1"),
    (["inference.blok_size=5"], "inference.blok_size"),
    (["model.context_parallel_size=four"], "model.context_parallel_size"),
    (["inference.block_size"], "overrides must look like key=value"),
])
def test_bad_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, REQUIRED + overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_longer_anchor_is_its_own_option():
    cfg = load_config(DEMO, REQUIRED + ["inference.anchor_size=3072", "inference.block_size=1024",
                                        "inference.star_context=long_anchor"])
    assert (cfg.inference.anchor_size, cfg.inference.star_context) == (3072, "long_anchor")
    cfg = load_config(DEMO, REQUIRED + ["inference.star_context=anchor+landmarks", "inference.landmarks=8",
                                        "inference.landmark_size=32"])
    assert (cfg.inference.landmarks, cfg.inference.landmark_size) == (8, 32)


def test_exactly_one_checkpoint_path():
    for overrides, message in (
            ([], "set exactly one of checkpoint.hf_path and checkpoint.megatron_path"),
            (["checkpoint.hf_path=/a", "checkpoint.megatron_path=/b"],
             "set exactly one of checkpoint.hf_path and checkpoint.megatron_path (got both: '/a', '/b')"),
            (["checkpoint.hf_path=/a", "checkpoint.iteration=100"],
             "checkpoint.iteration applies to checkpoint.megatron_path only"),
            (["checkpoint.hf_path=/a", "checkpoint.tokenizer_path=/t"],
             "checkpoint.tokenizer_path applies to checkpoint.megatron_path only"),
            (["checkpoint.megatron_path=/b", "checkpoint.iteration=-2"],
             "checkpoint.iteration must be >= 0, or -1 for the latest, got -2")):
        with pytest.raises(ConfigError) as e:
            load_config(DEMO, overrides)
        assert str(e.value) == message
    cfg = load_config(DEMO, ["checkpoint.megatron_path=/b", "checkpoint.iteration=100", "checkpoint.hf_config=/c"])
    assert (cfg.checkpoint.megatron_path, cfg.checkpoint.iteration, cfg.checkpoint.hf_path) == ("/b", 100, "")


def test_eval_section_and_paths_that_only_some_commands_need():
    cfg = load_config(DEMO, ["checkpoint.hf_path=/x", "eval.tasks=[vt,cwe]", "eval.lengths=[4096,8192]"])
    assert cfg.inference.input_path == "" and cfg.eval.output_path == ""  # generate / eval refuse them empty
    assert cfg.eval.tasks == ["vt", "cwe"] and cfg.eval.lengths == [4096, 8192] and cfg.eval.samples == 20
    for bad, message in ((["eval.samples=0"], "eval.samples must be >= 1"),
                         (["eval.lengths=[]"], "eval.lengths must be positive"),
                         (["eval.tokens_to_generate=-1"], "eval.tokens_to_generate must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(DEMO, ["checkpoint.hf_path=/x", *bad])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml", REQUIRED)


def test_printed_config_reloads_as_the_same_config(tmp_path, capsys):
    """`star-mcore config` output is a complete config: the launch scripts run every rank on it."""
    from star_mcore.cli.main import main

    overrides = REQUIRED + ["inference.context_parallel_mode=ring", "model.context_parallel_size=2",
                            "inference.save_logits=true", "distributed.timeout_s=12.5", "inference.anchor_size=0"]
    assert main(["config", "--config", DEMO, *overrides]) == 0
    printed = tmp_path / "resolved.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(str(printed)) == load_config(DEMO, overrides)
