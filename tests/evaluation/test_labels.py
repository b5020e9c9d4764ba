"""The yes/no/maybe parser on answers the way small models write them."""

from __future__ import annotations

import pytest

from evaluation.labels import parse_label


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("Yes.", "yes"),
        ("yes, the intervention increased screening rates.", "yes"),
        ("**Yes** [1]", "yes"),
        ("Based on the context, yes: telephone counselling worked.", "yes"),
        ("Indeed, the trial showed a benefit.", "yes"),
        ("There is no doubt that screening improved.", "yes"),
        ("It is likely that the drug helps.", "yes"),
        ("No.", "no"),
        ("No, it does not.", "no"),
        ("The study found no evidence of a benefit.", "no"),
        ("The treatment did not reduce mortality.", "no"),
        ("It doesn't improve outcomes.", "no"),
        ("It doesn\u2019t improve outcomes.", "no"),  # curly apostrophe
        ("Probably not, the effect was small.", "no"),
        ("This is unlikely to help.", "no"),
        ("Maybe.", "maybe"),
        ("Possibly, but the sample was small.", "maybe"),
        ("It is not clear whether the benefit lasts.", "maybe"),
        ("The evidence is unclear.", "maybe"),
        ("Not necessarily; it depends on the dose.", "maybe"),
        ("There is insufficient evidence to say.", "maybe"),
        ("There is no clear evidence either way.", "maybe"),
        ("Yes and no: results were mixed.", "maybe"),
        ("It cannot be determined from these data.", "maybe"),
        ("Further research is needed.", "maybe"),
        # "not only" decides nothing; the next cue does
        ("Not only did it fail, it was harmful. No.", "no"),
        ("Not only that, but yes it helped.", "yes"),
        # an echoed instruction ("begin with yes, no or maybe") is not an answer
        ("Yes, no or maybe: the main reason is the dose.", None),
        ("Yes, no, maybe, and the main reason in one sentence.", None),
        ("Yes or no? No, it did not.", "no"),
        # no cue at all
        ("Tailored print materials were mailed to participants.", None),
        ("", None),
        ("Nothing to see", None),  # "nothing" is not a cue word; "not" is matched whole
    ],
)
def test_parse_label(answer: str, label: str | None) -> None:
    assert parse_label(answer) == label


def test_echoed_question_is_skipped() -> None:
    question = "Is the drug not associated with harm?"
    answer = "Is the drug not associated with harm? Yes, it is safe."
    assert parse_label(answer, question) == "yes"
    assert parse_label(answer) == "no"  # without the question the echoed "not" decides


def test_labels_outside_the_task_are_unparsed() -> None:
    assert parse_label("Maybe.", labels=("yes", "no")) is None
    assert parse_label("Positive.", labels=("positive", "negative")) == "positive"
