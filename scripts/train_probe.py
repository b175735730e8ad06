#!/usr/bin/env python3
"""Train the probe model: a small Llama (HF layout) with its own small BPE tokenizer, trained from scratch on this
repo's synthetic long-context tasks (star_mcore.eval: RULER-style NIAH mostly, variable tracking, word counting,
BABILong-style facts) with a curriculum of context lengths, until plain global attention solves single NIAH.

It needs torch, transformers and tokenizers, not Megatron-core. Training is time-bounded and resumable:

    python scripts/train_probe.py --out models/probe --minutes 14               # one go
    python scripts/train_probe.py --out OUT --minutes 14 --stop-after 8.5       # two commands of < 10 min each:
    python scripts/train_probe.py --out OUT --minutes 14 --stop-after 8.5       # the second resumes from --state

``--state`` (default build/probe_state) keeps the tokenizer, weights and optimizer between commands. ``--out``
gets config.json, generation_config.json, model.safetensors (bf16), tokenizer.json, tokenizer_config.json and
probe_train.json (settings, loss curve, single-NIAH accuracy with global attention), written at every checkpoint
and at the end. ``--tiny --device cpu --steps 3`` is the smoke test the suite runs.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from star_mcore.eval.scoring import string_match_all  # noqa: E402  (plain Python: no Megatron-core here)
from star_mcore.eval.tasks import TASKS  # noqa: E402
from star_mcore.eval.text import TooShort  # noqa: E402

# What the model trains on: NIAH mostly (what the accuracy study measures), the rest so it reads facts too.
MIX: Dict[str, float] = {**{t: 7.0 for t in TASKS if t.startswith("niah")}, "vt": 6.0, "cwe": 3.0, "fwe": 3.0,
                         **{t: 6.0 for t in ("qa1", "qa2", "qa3", "qa4", "qa5")}}
EVAL_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3")
EVAL_SEED = 0  # star-mcore eval's default seed: the final check runs the very samples `eval ruler` runs
TRAIN_SEED = 1_000_003  # training draws seeds from here up, so it never sees an eval sample
ANSWER_ROOM = 64  # tokens kept free after the prompt for the answer and EOS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/probe", help="HF checkpoint directory to write")
    p.add_argument("--state", default="build/probe_state", help="resumable training state (tokenizer, optimizer)")
    p.add_argument("--minutes", type=float, default=14.0, help="total training time over all commands")
    p.add_argument("--stop-after", type=float, default=None,
                   help="minutes of training in this command; save the state and stop (rerun to resume)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a few-second CPU configuration for tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--min-len", type=int, default=512)
    p.add_argument("--max-len", type=int, default=16384, help="the curriculum's longest context (>= 8192)")
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--lm-weight", type=float, default=0.2, help="weight of the plain LM loss beside the answer loss")
    p.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    p.add_argument("--checkpoint-every", type=float, default=3.0, help="minutes between checkpoints + quick evals")
    p.add_argument("--eval-lengths", default=None, help="comma-separated; default 2048 .. --max-len by doubling")
    p.add_argument("--eval-samples", type=int, default=30, help="per task and length in the final eval")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.layers, args.hidden, args.heads, args.kv_heads, args.ffn = 384, 2, 64, 4, 2, 128
        args.min_len, args.max_len, args.tokens_per_step, args.workers, args.warmup = 256, 512, 1024, 0, 2
        args.eval_lengths, args.eval_samples = args.eval_lengths or "512", min(args.eval_samples, 1)
    lengths = [args.min_len]
    while lengths[-1] < args.max_len:
        lengths.append(min(2 * lengths[-1], args.max_len))
    args.lengths = lengths
    args.eval_lengths = ([int(x) for x in args.eval_lengths.split(",")] if args.eval_lengths else
                         [n for n in (2048, 4096, 8192, 16384, 32768) if n <= args.max_len])
    return args


class BPE:
    """The probe's tokenizer through the ``tokenizers`` library, with the interface the generators take."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.t = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.bos, self.eos = self.t.token_to_id("<s>"), self.t.token_to_id("</s>")

    def encode(self, text: str, add_bos: bool) -> List[int]:
        ids = self.t.encode(text, add_special_tokens=False).ids
        return [self.bos] + ids if add_bos else ids

    def prompt(self, context: str, query: str) -> Tuple[List[int], List[int]]:
        """BOS + context and the query, tokenized apart: what ``star-mcore eval`` gives the engine (no chat)."""
        return self.encode(context, True), self.encode(query, False)

    def decode(self, ids: List[int]) -> str:
        return self.t.decode(ids, skip_special_tokens=True)

    def __len__(self) -> int:
        return self.t.get_vocab_size()


class _Words:
    """A rough token count (words) for drafting the tokenizer's training text before the tokenizer exists."""

    def prompt(self, context: str, query: str) -> Tuple[List[int], List[int]]:
        return [0] * len(context.split()), [0] * len(query.split())


def train_tokenizer(path: Path, vocab: int, texts_per_task: int) -> None:
    """Byte-level BPE on the tasks' own text, digits split one by one (a value copies digit for digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for i, name in enumerate(t for t in MIX):
        for j in range(texts_per_task):
            s = TASKS[name].make(TRAIN_SEED - 1, j, 1200 + 37 * i, _Words())
            texts += [s.context, s.query + s.answer]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}, indent=2))


def curriculum(frac: float, lengths: List[int], rng: random.Random) -> int:
    """A context length for the next batch: longer lengths unlock evenly over the first 60% of the time; half
    the batches take the longest unlocked length, the rest any unlocked one."""
    unlocked = lengths[:min(len(lengths), 1 + int(frac / 0.6 * (len(lengths) - 1) + 1e-9))]
    return unlocked[-1] if rng.random() < 0.5 else rng.choice(unlocked)


class Batches(torch.utils.data.IterableDataset):
    """Endless batches of (ids, answer mask, valid mask); the length follows the shared training progress."""

    def __init__(self, tok_dir: Path, args: argparse.Namespace, progress, salt: int) -> None:
        self.tok_dir, self.args, self.progress, self.salt = tok_dir, args, progress, salt

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"train|{self.args.seed}|{self.salt}|{info.id if info else 0}")
        tok = BPE(self.tok_dir)
        names, weights = list(MIX), list(MIX.values())
        while True:
            length = curriculum(self.progress.value, self.args.lengths, rng)
            rows = []
            for _ in range(max(1, self.args.tokens_per_step // length)):
                task = rng.choices(names, weights)[0]
                try:
                    s = TASKS[task].make(TRAIN_SEED + rng.randrange(1 << 30), 0, length - ANSWER_ROOM, tok,
                                         depth=rng.random())
                except TooShort:
                    continue
                prompt = sum(tok.prompt(s.context, s.query), [])
                answer = tok.encode(s.answer, False) + [tok.eos]
                rows.append((prompt + answer, len(prompt)))
            if not rows:
                continue
            width = max(len(r) for r, _ in rows)
            ids = torch.full((len(rows), width), tok.eos, dtype=torch.long)
            ans = torch.zeros((len(rows), width), dtype=torch.bool)
            valid = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, (r, n) in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                ans[i, n:len(r)] = True
                valid[i, :len(r)] = True
            yield ids, ans, valid


def build_model(args: argparse.Namespace, tok: BPE):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(32768, 2 * args.max_len),
                      rope_theta=args.rope_theta, rms_norm_eps=1e-5, bos_token_id=tok.bos, eos_token_id=tok.eos,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def export(model, tok_dir: Path, out: Path, summary: dict) -> None:
    """HF layout: config, bf16 safetensors, generation config with EOS, the tokenizer, the training summary."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.update(architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    if "dtype" in cfg:  # transformers >= 5 names it so
        cfg["dtype"] = "bfloat16"
    cfg.pop("_attn_implementation_autoset", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id, "do_sample": False},
        indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    (out / "probe_train.json").write_text(json.dumps(summary, indent=2))


@torch.no_grad()
def niah_accuracy(model, tok: BPE, lengths: List[int], samples: int, device: torch.device) -> Dict[str, float]:
    """Single-NIAH score (%) per task and length, greedy, global attention (HF's own forward)."""
    model.eval()
    result = {}
    for task in EVAL_TASKS:
        for n in lengths:
            scores = []
            for i in range(samples):
                s = TASKS[task].make(EVAL_SEED, i, n, tok)
                ids = torch.tensor([sum(tok.prompt(s.context, s.query), [])], device=device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos,
                                         pad_token_id=tok.eos)
                scores.append(string_match_all(tok.decode(out[0, ids.shape[1]:].tolist()), s.references))
            result[f"{task}@{n}"] = round(100 * sum(scores) / len(scores), 1)
    model.train()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    state_dir, out = Path(args.state), Path(args.out)
    tok_dir = state_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        t0 = time.time()
        train_tokenizer(tok_dir, args.vocab, texts_per_task=2 if args.tiny else 40)
        print(f"tokenizer: trained in {time.time() - t0:.0f}s -> {tok_dir}", flush=True)
    tok = BPE(tok_dir)
    model = build_model(args, tok).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    ckpt = state_dir / "train_state.pt"
    run = {"step": 0, "elapsed_s": 0.0, "tokens": 0, "answer_tokens": 0, "log": [], "checks": []}
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        run = saved["run"]
        print(f"resuming at step {run['step']}, {run['elapsed_s'] / 60:.1f} of {args.minutes} minutes", flush=True)
    print(f"model: {n_params / 1e6:.1f}M parameters, vocab {len(tok)}; lengths {args.lengths}; "
          f"{args.tokens_per_step} tokens per step on {device}", flush=True)

    budget = 60 * args.minutes
    progress = mp.Value("d", run["elapsed_s"] / budget)
    loader = torch.utils.data.DataLoader(Batches(tok_dir, args, progress, salt=run["step"]), batch_size=None,
                                         num_workers=args.workers, prefetch_factor=4 if args.workers else None,
                                         persistent_workers=False)

    def summary() -> dict:
        keep = {k: v for k, v in vars(args).items() if k not in ("out", "state", "device")}
        return {"args": keep, "parameters": n_params, **{k: v for k, v in run.items()}}

    def save_state() -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "run": run}, ckpt)
        export(model, tok_dir, out, summary())

    start = time.time()
    base_elapsed = run["elapsed_s"]
    last_ckpt = start
    window: List[torch.Tensor] = []
    model.train()
    for ids, ans, valid in loader:
        run["elapsed_s"] = base_elapsed + time.time() - start
        frac = run["elapsed_s"] / budget
        this_run_min = (time.time() - start) / 60
        if frac >= 1 or (args.steps is not None and run["step"] >= args.steps) or \
                (args.stop_after is not None and this_run_min >= args.stop_after):
            break
        progress.value = frac
        lr = args.lr * min(1.0, (run["step"] + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, ans, valid = ids.to(device, non_blocking=True), ans.to(device), valid.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                             reduction="none").view(ids.shape[0], -1)
        a, v = ans[:, 1:].float(), valid[:, 1:].float()
        answer_loss = (ce * a).sum() / a.sum().clamp(min=1)
        loss = answer_loss + args.lm_weight * (ce * v).sum() / v.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run["step"] += 1
        run["tokens"] += int(valid.sum())
        run["answer_tokens"] += int(ans.sum())
        window.append(answer_loss.detach())
        if run["step"] % 50 == 0 or args.tiny:
            entry = {"step": run["step"], "minutes": round(run["elapsed_s"] / 60, 2), "length": ids.shape[1],
                     "answer_loss": round(float(torch.stack(window).mean()), 4), "lr": round(lr, 6)}
            run["log"].append(entry)
            window = []
            print(json.dumps(entry), flush=True)
        if time.time() - last_ckpt >= 60 * args.checkpoint_every:
            longest = args.lengths[min(len(args.lengths) - 1, int(frac / 0.6 * (len(args.lengths) - 1) + 1e-9))]
            check = niah_accuracy(model, tok, [longest], 8, device)
            run["checks"].append({"step": run["step"], "minutes": round(run["elapsed_s"] / 60, 2), **check})
            print(f"check (8 samples, global attention): {check}", flush=True)
            save_state()
            last_ckpt = time.time()

    finished = run["elapsed_s"] >= budget or (args.steps is not None and run["step"] >= args.steps)
    if not finished:
        save_state()
        print(f"stopped at step {run['step']} after {run['elapsed_s'] / 60:.1f} of {args.minutes} minutes; "
              f"rerun the same command to resume (state in {state_dir}, current weights in {out})", flush=True)
        return 0
    t0 = time.time()
    run["final_niah"] = niah_accuracy(model, tok, args.eval_lengths, args.eval_samples, device)
    run["final_eval_s"] = round(time.time() - t0, 1)
    save_state()
    print(f"final single-NIAH score with global attention ({args.eval_samples} samples per cell, seed "
          f"{EVAL_SEED}):", flush=True)
    for key, val in run["final_niah"].items():
        print(f"  {key:28s} {val:5.1f}", flush=True)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer, probe_train.json)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
