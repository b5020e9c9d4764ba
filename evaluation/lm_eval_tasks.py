"""The likelihood-scored questions of each arm as lm-evaluation-harness tasks, so the bench's
numbers can be checked with lm-eval itself on exactly the same prompts:

    lm_eval --model local-completions \\
        --model_args model=MODEL,base_url=URL/v1/completions,tokenizer_backend=remote \\
        --include_path OUT/lm_eval --tasks ragtune_ARM

`OUT/lm_eval/<arm>.jsonl` holds per question the arm's prompt text (`context`, the rendered
chat prompt the bench scored), `choices` and the index of the right one; `ragtune_<arm>.yaml`
is a `multiple_choice` task over it with an empty target delimiter (the choice follows the
prompt directly, as the bench scores it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CONTEXT_KEY = "likelihood_context"

TASK = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def task_name(arm: str) -> str:
    return "ragtune_" + re.sub(r"[^a-z0-9]+", "_", arm.lower()).strip("_")


def write_lm_eval_tasks(out: Path, rows_by_arm: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Write the tasks of every arm with scored choices; drop the prompt texts from the
    rows (results.json keeps the scores, not the prompts). Returns the task names."""
    names = []
    directory = out / "lm_eval"
    for arm, rows in rows_by_arm.items():
        docs = []
        for row in rows:
            context = row.pop(CONTEXT_KEY, None)
            choices = row.get("choices")
            if context is None or not choices or row.get("gold_index") is None:
                continue
            docs.append(
                {"id": row["id"], "context": context, "choices": choices, "gold": row["gold_index"]}
            )
        if not docs:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        data = directory / f"{arm.replace('+', '_')}.jsonl"
        data.write_text(
            "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8"
        )
        name = task_name(arm)
        (directory / f"{name}.yaml").write_text(
            TASK.format(task=name, data=data.resolve()), encoding="utf-8"
        )
        names.append(name)
    return names
