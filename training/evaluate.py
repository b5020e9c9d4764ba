"""Does an adapter answer questions about its documents better than the base model?

`python -m training.evaluate --adapter demo --questions data/demo/eval_questions.jsonl`
generates greedy answers to held-out, hand-written questions with the adapter and with the
adapter disabled (same weights, same template), and scores both: keyword hit rate (does the
answer contain the fact, e.g. "Keystone" or "4410") and token F1 against a reference answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.chunks import is_japanese

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+(?:[-,.][a-z0-9]+)*")


def answer_tokens(text: str) -> list[str]:
    """Lower-cased words; Japanese (no spaces) as single characters."""
    text = text.lower()
    tokens = _WORD.findall(text)
    if is_japanese(text):
        tokens += [char for char in text if is_japanese(char)]
    return tokens


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def keyword_hit(prediction: str, keywords: Sequence[str]) -> bool:
    lowered = prediction.lower()
    return any(keyword.lower() in lowered for keyword in keywords)


def score(answers: Sequence[str], questions: Sequence[dict[str, Any]]) -> dict[str, float]:
    hits = [keyword_hit(a, q["keywords"]) for a, q in zip(answers, questions, strict=True)]
    f1s = [token_f1(a, q["answer"]) for a, q in zip(answers, questions, strict=True)]
    return {
        "keyword_hit_rate": round(sum(hits) / len(hits), 3),
        "token_f1": round(sum(f1s) / len(f1s), 3),
    }


def resolve_adapter(value: str, home: Path) -> Path:
    """A directory, or an adapter name: its newest vN under $RAGTUNE_HOME/adapters/NAME."""
    path = Path(value)
    if path.is_dir():
        return path
    root = home / "adapters" / value
    versions = sorted((int(p.name[1:]), p) for p in root.glob("v*") if p.name[1:].isdigit())
    if not versions:
        raise FileNotFoundError(f"no adapter directory or adapter named {value!r} in {root}")
    return versions[-1][1]


def evaluate(
    adapter_dir: Path,
    questions: list[dict[str, Any]],
    base_model: str,
    home: Path,
    max_new_tokens: int = 48,
) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    from ragtune.config import ModelConfig
    from ragtune.models import load_base_model
    from ragtune.models.chat import encode_prompt, render_chat

    loaded = load_base_model(
        ModelConfig(source=base_model, quantization="none", dtype="fp32", device="cpu"), home
    )
    model = PeftModel.from_pretrained(loaded.model, adapter_dir)
    model.eval()
    tokenizer = loaded.tokenizer

    def generate(question: str) -> str:
        prompt = render_chat(tokenizer, [{"role": "user", "content": question}])
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        logger.info("%s -> %s", question, answer)
        return answer

    with model.disable_adapter():
        base = [generate(q["question"]) for q in questions]
    model.merge_adapter()  # merged weights generate as fast as the base (no adapter calls)
    tuned = [generate(q["question"]) for q in questions]
    return {
        "adapter": str(adapter_dir),
        "questions": len(questions),
        "base": score(base, questions),
        "adapter_scores": score(tuned, questions),
        "answers": [
            {"question": q["question"], "base": b, "adapter": t}
            for q, b, t in zip(questions, base, tuned, strict=True)
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from ragtune.config import default_home

    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapter", required=True, help="adapter dir, or adapter name")
    parser.add_argument("--questions", type=Path, default=Path("data/demo/eval_questions.jsonl"))
    parser.add_argument("--base-model", default="bundled")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, help="write the full report (with answers) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    home = default_home()
    questions = [
        json.loads(line)
        for line in args.questions.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    report = evaluate(
        resolve_adapter(args.adapter, home), questions, args.base_model, home, args.max_new_tokens
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    summary = {key: report[key] for key in ("adapter", "questions", "base", "adapter_scores")}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
