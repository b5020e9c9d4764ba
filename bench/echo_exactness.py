"""Whether a server's generation request gives the echo's numbers: for PubMedQA questions
as chat prompts, the first generated token's top alternatives against an echo
(`/v1/completions`, `echo`, `max_tokens: 0`) of the rendered prompt's ids plus that token,
which is what lm-eval's `local-completions` reads. Where they are equal, the bench's
likelihood can be read from the generation request (`--likelihood-from generation`).

    python bench/echo_exactness.py --url http://127.0.0.1:8000 --api-key KEY --questions 12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx

DATA = Path(__file__).resolve().parent.parent / "data" / "pubmedqa" / "pqal_dev.jsonl"
SYSTEM = (
    "Answer the question. Begin with yes, no or maybe, then give the main reason in one sentence."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's root")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--alternatives", type=int, default=3)
    args = parser.parse_args()
    client = httpx.Client(
        base_url=args.url, headers={"Authorization": f"Bearer {args.api_key}"}, timeout=300
    )
    rows = [json.loads(line) for line in DATA.open()][: args.questions]
    same, diffs = 0, []
    for row in rows:
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": row["question"]},
        ]
        chat = client.post(
            "/v1/chat/completions",
            json={"model": args.model, "messages": messages, "max_tokens": 1,
                  "temperature": 0, "logprobs": True, "top_logprobs": 20},
        ).json()  # fmt: skip
        top = chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        ids = client.post("/tokenize", json={"model": args.model, "messages": messages}).json()
        for alternative in top[: args.alternatives]:
            token = client.post(
                "/tokenize",
                json={"model": args.model, "prompt": alternative["token"],
                      "add_special_tokens": False},
            ).json()["tokens"]  # fmt: skip
            if len(token) != 1:
                continue
            echo = client.post(
                "/v1/completions",
                json={"model": args.model, "prompt": ids["tokens"] + token, "max_tokens": 0,
                      "echo": True, "logprobs": 1, "temperature": 0},
            ).json()  # fmt: skip
            echoed = echo["choices"][0]["logprobs"]["token_logprobs"][-1]
            same += echoed == alternative["logprob"]
            diffs.append(abs(echoed - alternative["logprob"]))
    print(json.dumps({"compared": len(diffs), "identical": same,
                      "max_abs_diff": max(diffs, default=0.0)}))  # fmt: skip


if __name__ == "__main__":
    main()
