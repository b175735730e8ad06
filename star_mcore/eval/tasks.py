"""The task registry: which benchmark a task belongs to, its generator, its score and its token budget
(RULER's and BABILong's defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from . import babilong, ruler
from .scoring import METRICS
from .text import Sample, TextTokenizer


@dataclass(frozen=True)
class Task:
    name: str
    benchmark: str  # ruler | babilong
    metric: str  # a key of scoring.METRICS
    tokens_to_generate: int
    generator: Callable[..., Sample]
    data_key: Optional[str] = None  # the eval config key of the local file the task reads
    loader: Optional[Callable[[str], ruler.QAData]] = None

    def make(self, seed: int, index: int, length: int, tok: TextTokenizer, depth: Optional[float] = None,
             data: Optional[ruler.QAData] = None) -> Sample:
        return self.generator(self.name, seed, index, length, tok, depth=depth, data=data)

    def score(self, prediction: str, references: List[str]) -> float:
        return METRICS[self.metric](prediction, references)


def _ruler_task(name: str) -> Task:
    if name.startswith("niah"):
        return Task(name, "ruler", "string_match_all", 128, ruler.GENERATORS[name])
    if name.startswith("qa"):
        key, loader = {"qa_1": ("squad_path", ruler.load_squad), "qa_2": ("hotpotqa_path", ruler.load_hotpotqa)}[name]
        return Task(name, "ruler", "string_match_part", 32, ruler.GENERATORS[name], key, loader)
    return Task(name, "ruler", "string_match_all", {"vt": 30, "cwe": 120, "fwe": 50}[name], ruler.GENERATORS[name])


TASKS: Dict[str, Task] = {name: _ruler_task(name) for name in ruler.GENERATORS}
TASKS.update({name: Task(name, "babilong", "string_match_all", 20, gen) for name, gen in babilong.GENERATORS.items()})
BENCHMARKS: Dict[str, List[str]] = {b: [t.name for t in TASKS.values() if t.benchmark == b]
                                    for b in ("ruler", "babilong")}


def select(benchmark: str, names: Sequence[str]) -> List[Task]:
    """The named tasks of ``benchmark`` (all of them when ``names`` is empty); ValueError names a stranger."""
    known = BENCHMARKS[benchmark]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"eval.tasks: {', '.join(bad)} not in {benchmark} (its tasks: {', '.join(known)})")
    return [TASKS[n] for n in (names or known)]
