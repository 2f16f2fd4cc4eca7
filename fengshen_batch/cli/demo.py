"""`fengshen-batch demo`: the whole product on this machine, with a tiny random-weight GPT2.

It writes a model and a small prompt set under the demo folder, runs a score job and a generate job on Ray
(the same code path as a cluster job), and prints a few result rows and where everything is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..api import run
from ..spec import GenerateJob, JudgeJob, ScoreJob
from ..tiny_model import SAMPLE_LINES, build_tiny_gpt2

PROMPTS = ["北京位于", "Diabetics should not eat", "阿司匹林常用于", "Aspirin is used for"]
QUESTIONS = [
    ("What is aspirin used for?", ["fever", "broken bones"], "fever"),
    ("What does smoking cause?", ["lung cancer", "better sleep"], "lung cancer"),
    ("阿司匹林用于治疗什么？", ["退烧", "骨折"], "退烧"),
]


def _short(text: str, width: int = 34) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(output: str, address: str | None, echo: Callable[[str], None] = print) -> None:
    root = Path(output).resolve()
    model = build_tiny_gpt2(root / "model", n_positions=128)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "questions").mkdir(parents=True, exist_ok=True)
    half = len(SAMPLE_LINES) // 2
    for i, lines in enumerate((SAMPLE_LINES[:half], SAMPLE_LINES[half:])):
        source = ["zh" if any("\u4e00" <= c <= "\u9fff" for c in t) else "en" for t in lines]
        pq.write_table(pa.table({"text": lines, "source": source}), root / "texts" / f"part-{i}.parquet")
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS}),
        root / "prompts" / "p.parquet",
    )
    common = {"model": str(model), "actors": 1, "address": address}

    echo(f"scoring {len(SAMPLE_LINES)} texts with a tiny random-weight GPT2 ({model})")
    run(
        ScoreJob(input=str(root / "texts"), output=str(root / "score"), **common),
        progress=echo,
        overwrite=True,
    )
    echo("generating 2 samples per prompt")
    run(
        GenerateJob(input=str(root / "prompts"), output=str(root / "generate"), max_new_tokens=12,
                    num_return_sequences=2, seed=0, **common),
        progress=echo,
        overwrite=True,
    )  # fmt: skip

    pq.write_table(
        pa.table({"question": [q for q, _, _ in QUESTIONS], "answers": [a for _, a, _ in QUESTIONS],
                  "label": [label for _, _, label in QUESTIONS]}),
        root / "questions" / "q.parquet",
    )  # fmt: skip
    echo("judging 3 questions by perplexity (Yuyuan style)")
    judged = run(
        JudgeJob(input=str(root / "questions"), output=str(root / "judge"), answers_column="answers",
                 label_column="label", **common),
        progress=echo,
        overwrite=True,
    )  # fmt: skip

    scores = pq.read_table(root / "score" / "data").sort_by("id").to_pylist()
    echo("\nscore (random weights, so perplexities are high):")
    echo(f"{'text':36} {'tokens':>6} {'ppl':>9} {'bits/byte':>9}")
    for row in scores[:6]:
        echo(
            f"{_short(row['text']):36} {row['token_count']:>6} {row['ppl']:>9.1f} {row['bits_per_byte']:>9.3f}"
        )
    gens = pq.read_table(root / "generate" / "data").sort_by(
        [("id", "ascending"), ("sample_index", "ascending")]
    )
    echo("\ngenerate (random weights, so the text is noise):")
    echo(f"{'prompt':26} {'#':>2} {'tokens':>6} {'finish':>7}  generation")
    for row in gens.to_pylist()[:6]:
        echo(
            f"{_short(row['prompt'], 24):26} {row['sample_index']:>2} {row['generated_tokens']:>6} "
            f"{row['finish_reason']:>7}  {_short(row['generation'], 30)!r}"
        )
    echo("\njudge (random weights, so choices are a coin toss; Yuyuan-GPT2-3.5B is the real judge):")
    for row in pq.read_table(root / "judge" / "data").to_pylist():
        ppl = ", ".join(f"{p:,.0f}" for p in row["candidate_ppl"])
        echo(f"  {row['question']}  ->  {row['statements'][row['choice']]!r}  (ppl {ppl})")
    echo(f"  accuracy against labels: {judged.manifest['judge']['accuracy']:.2f}")
    echo(f"\nscore report: {root / 'score' / 'report' / 'report.html'}")
    echo(
        f"outputs: {root / 'score'}, {root / 'generate'}, {root / 'judge'} (data/, errors/, manifest.json, _SUCCESS)"
    )
