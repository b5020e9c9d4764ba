"""Likelihood scoring against a real server on the bundled model in float32 with dense
weights, checked against Hugging Face computing the same log-likelihoods on the same
weights with lm-evaluation-harness's formula (no mocked model): the sum of the
continuation tokens' log-softmax, the continuation cut as lm-eval's `_encode_pair` cuts it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evaluation.likelihood import choice_metrics, encode_pair, score_choices
from evaluation.prompts import chat_messages
from evaluation.runner import LABEL_PROMPT
from evaluation.server_api import ScoringClient
from ragtune.launcher import start_server
from tests.conftest import API_KEY, SERVER_ENV

QUESTIONS = [
    "Does regular exercise lower resting blood pressure in adults?",
    "Is the Keystone app used for multi-factor authentication at Orvane Logistics?",
]
# single-token labels (the shared-prefill path), a multi-token answer and an unlikely one
# (both scored by requests of their own)
CHOICES = ("Yes", "No", "Maybe", "Not sure", " banana")


@pytest.fixture(scope="module")
def fp32_server(tmp_path_factory):
    env = {
        **SERVER_ENV,
        "RAGTUNE_MODEL__QUANTIZATION": "none",
        "RAGTUNE_MODEL__DTYPE": "fp32",
        "RAGTUNE_ENGINE__WEIGHTS": "dense",
    }
    running = start_server(env, tmp_path_factory.mktemp("ll-server") / "server.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.config import default_home
    from ragtune.models.loader import resolve_model_dir

    directory: Path = resolve_model_dir("bundled", default_home())
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def hf_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's HF computation: log_softmax over the whole sequence, continuation rows."""

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ctx, cont = encode_pair(tokenize, context, continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(ctx) - 1 : -1], dim=-1)
    target = torch.tensor(cont)
    picked = logprobs[torch.arange(len(cont)), target]
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return float(picked.sum()), greedy


def test_choice_loglikelihoods_equal_hugging_face(fp32_server, hf_model) -> None:
    model, tokenizer = hf_model
    client = ScoringClient(fp32_server.v1, API_KEY)
    try:
        for question in QUESTIONS:
            messages = chat_messages(LABEL_PROMPT, question)
            ids = client.tokenize_messages("smollm2-135m-instruct", messages)
            context = client.detokenize("smollm2-135m-instruct", ids)
            assert client.tokenize("smollm2-135m-instruct", context) == ids  # round trip
            scores = score_choices(client, "smollm2-135m-instruct", context, CHOICES)
            for choice, score in zip(CHOICES, scores, strict=True):
                expected, greedy = hf_loglikelihood(model, tokenizer, context, choice)
                assert math.isclose(score.loglikelihood, expected, abs_tol=2e-3), (
                    question,
                    choice,
                    score.loglikelihood,
                    expected,
                )
                assert score.greedy == greedy
            metrics = choice_metrics(scores, CHOICES, gold=0)
            assert metrics["likelihood_choice"] in CHOICES
            assert metrics["likelihood_choice"] != " banana"
    finally:
        client.close()


def test_lm_eval_metrics_from_loglikelihoods() -> None:
    from evaluation.likelihood import ChoiceScore

    scores = [ChoiceScore(-2.0, True, 1), ChoiceScore(-2.5, False, 3), ChoiceScore(-9.0, False, 1)]
    choices = ("no", "maybe so", "yes")
    metrics = choice_metrics(scores, choices, gold=1)
    assert metrics["likelihood_choice"] == "no"  # highest sum
    assert metrics["likelihood_choice_norm"] == "maybe so"  # -2.5 / 8 > -2.0 / 2
    assert (metrics["likelihood_accuracy"], metrics["likelihood_acc_norm"]) == (0.0, 1.0)
    tie = choice_metrics([ChoiceScore(-1.0, True, 1)] * 2, ("a", "b"), gold=1)
    assert tie["likelihood_choice"] == "a"  # numpy's argmax: the first of equal maxima
    japanese = choice_metrics(
        [ChoiceScore(-3.0, True, 1), ChoiceScore(-4.0, True, 1)], ("はい", "yes"), gold=1
    )
    # per character yes wins (-1.33 vs -1.5); per UTF-8 byte はい wins (-0.5 vs -1.33)
    assert japanese["likelihood_acc_norm"] == 1.0 and japanese["likelihood_acc_bytes"] == 0.0


def test_encode_pair_moves_trailing_whitespace_like_lm_eval() -> None:
    seen = []

    def tokenize(text: str) -> list[int]:
        seen.append(text)
        return [ord(c) for c in text]

    ctx, cont = encode_pair(tokenize, "Answer:\n ", "Yes")
    assert seen == ["Answer:\n Yes", "Answer:"]
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(c) for c in "\n Yes"]


def test_arms_score_choices_and_free_text_references(fp32_server, hf_model) -> None:
    """`score_arms` as the bench runs it: a labelled row gets lm-eval's metrics, a free-text
    row its reference's log-likelihood per byte, both after the arm's own chat prompt."""
    from evaluation.dataset import QAItem
    from evaluation.likelihood_arms import LikelihoodSettings, score_arms
    from evaluation.runner import Arm

    model, tokenizer = hf_model
    items = [
        QAItem("l", QUESTIONS[0], label="yes"),
        QAItem("f", QUESTIONS[1], answers=("Yes, Keystone is the authenticator app.",)),
    ]
    client = ScoringClient(fp32_server.v1, API_KEY)
    ids = {
        item.id: client.tokenize_messages(
            "smollm2-135m-instruct", chat_messages(LABEL_PROMPT, item.question)
        )
        for item in items
    }
    rows = {"base": [{"id": i.id, "prompt_tokens": len(ids[i.id])} for i in items]}
    settings = LikelihoodSettings("smollm2-135m-instruct", LABEL_PROMPT, ("yes", "no", "maybe"))
    try:
        facts = score_arms(
            client, [Arm("base", "smollm2-135m-instruct", False)], items, rows, settings, False
        )
    finally:
        client.close()
    assert facts["base"]["errors"] == 0 and facts["base"]["prompt_mismatches"] == 0
    labelled, free = rows["base"]
    assert labelled["choices"] == ["Yes", "No", "Maybe"]
    assert labelled["likelihood_accuracy"] == float(labelled["likelihood_choice"] == "Yes")
    context = tokenizer.decode(ids["f"])
    expected, _ = hf_loglikelihood(model, tokenizer, context, items[1].answers[0])
    per_byte = expected / len(items[1].answers[0].encode("utf-8"))
    assert math.isclose(free["reference_loglik_per_byte"], per_byte, abs_tol=1e-4)
    assert "likelihood_accuracy" not in free


def test_choices_read_from_the_generation_request_equal_the_echoed_ones(fp32_server) -> None:
    """`--likelihood-from generation`: the generation request's own prompt logprobs and
    first-token alternatives give each choice's score without another prefill; where the
    server's prompt rows do not depend on the prompt's length (float32 here, to summation
    order) they are the echoed scores, and every pick is the same. A choice outside the
    alternatives kept is an upper bound that cannot win, or is settled by an echo."""
    import openai

    from evaluation.dataset import QAItem
    from evaluation.likelihood_arms import LikelihoodSettings, score_arms
    from evaluation.runner import GENERATION_SCORES_KEY, Arm, GenerationSettings, ask

    model = "smollm2-135m-instruct"
    items = [QAItem(f"q{i}", q, label="yes") for i, q in enumerate(QUESTIONS)]
    arm = Arm("base", model, False)
    openai_client = openai.OpenAI(base_url=fp32_server.v1, api_key=API_KEY)
    rows = {}
    for reuse in (True, False):
        settings = GenerationSettings(
            max_tokens=2, system_prompt=LABEL_PROMPT, score_from_generation=reuse
        )
        rows[reuse] = {"base": [ask(openai_client, arm, item, settings) for item in items]}
    assert all(row[GENERATION_SCORES_KEY] for row in rows[True]["base"])
    client = ScoringClient(fp32_server.v1, API_KEY)
    labels = ("yes", "no", "maybe")
    try:
        facts = {
            reuse: score_arms(
                client,
                [arm],
                items,
                rows[reuse],
                LikelihoodSettings(model, LABEL_PROMPT, labels),
                False,
            )
            for reuse in (True, False)
        }
    finally:
        client.close()
    read = facts[True]["base"]
    assert read["from_generation"] + read["settled_by_echo"] == len(items)
    assert facts[False]["base"]["from_generation"] == 0
    for got, echoed in zip(rows[True]["base"], rows[False]["base"], strict=True):
        assert got["likelihood_source"] in ("generation", "generation+echo")
        assert echoed["likelihood_source"] == "echo"
        for key in ("likelihood_choice", "likelihood_choice_norm", "likelihood_accuracy"):
            assert got[key] == echoed[key]
        for value, bound, exact in zip(
            got["loglikelihoods"],
            got["loglikelihood_bounds"],
            echoed["loglikelihoods"],
            strict=True,
        ):
            if value is None:
                assert exact <= bound + 1e-4  # the bound holds
            else:
                assert math.isclose(value, exact, abs_tol=1e-4)


def test_least_likely_choice_is_the_one_the_alternatives_rank_lowest() -> None:
    from evaluation.likelihood import least_likely

    top = {"Yes": -0.2, "No": -1.9, "Maybe": -6.5}
    assert least_likely(["Yes", "No", "Maybe"], top) == 2
    assert least_likely(["Yes", "Perhaps", "Maybe"], top) == 1  # absent: below every kept one
    assert least_likely(["Yes", "No"], None) == 0  # no hint: the first


def test_echoing_the_least_likely_choice_reads_the_others_from_its_alternatives(
    fp32_server,
) -> None:
    """The bench echoes the choice its generation request ranked lowest: the same values
    as echoing the first choice, from no more prefilled prompts (one per question where
    the others are among that position's top alternatives)."""
    import openai

    from evaluation.dataset import QAItem
    from evaluation.likelihood import choice_pairs, least_likely
    from evaluation.runner import GENERATION_SCORES_KEY, Arm, GenerationSettings, ask

    model = "smollm2-135m-instruct"
    labels = ("Yes", "No", "Maybe")
    openai_client = openai.OpenAI(base_url=fp32_server.v1, api_key=API_KEY)
    settings = GenerationSettings(
        max_tokens=1, system_prompt=LABEL_PROMPT, first_token_alternatives=True
    )
    client = ScoringClient(fp32_server.v1, API_KEY)
    try:
        for i, question in enumerate(QUESTIONS):
            row = ask(openai_client, Arm("base", model, False), QAItem(f"q{i}", question), settings)
            kept = row[GENERATION_SCORES_KEY]
            assert kept["prompt_tail"] is None and len(kept["first_top"]) == 20
            ids = client.tokenize_messages(model, chat_messages(LABEL_PROMPT, question))
            context = client.detokenize(model, ids)
            pairs = choice_pairs(client, model, context, labels)
            texts = client.token_texts(model, [cont[-1] for _, cont in pairs])
            first = least_likely(texts, kept["first_top"])
            assert kept["first_top"].get(texts[first], -math.inf) == min(
                kept["first_top"].get(text, -math.inf) for text in texts
            )
            counts, values = [], []
            for echo_first in (0, first):
                before = client.scored_prompts
                scores = score_choices(
                    client, model, context, labels, pairs=pairs, first=echo_first
                )
                counts.append(client.scored_prompts - before)
                values.append([score.loglikelihood for score in scores])
            assert counts[1] <= counts[0] and counts[1] >= 1
            for read, echoed in zip(values[1], values[0], strict=True):
                assert math.isclose(read, echoed, abs_tol=1e-4)
    finally:
        client.close()
