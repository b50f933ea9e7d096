"""Golden cases for answer extraction and the exact / choice / number verifiers."""

import pytest

from zipr1_jax.data.verifiers import (extract_answer, normalize_text, parse_number, verify,
                                      verify_choice, verify_exact, verify_number)


@pytest.mark.parametrize("response,expected", [
    ("<think>hm</think><answer> red </answer>", "red"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
    ("<ANSWER>Blue</ANSWER>", "Blue"),
    ("reasoning... <answer>green", "green"),  # unclosed tag
    ("so \\boxed{42} done", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("line one\nAnswer: 7\n", "7"),
    ("the final answer is: B", "B"),
    ("first\n\n last line \n", "last line"),
    ("<answer></answer>", None),
    ("", None),
    ("   \n  ", None),
    (None, None),
    (123, None),
    ("<answer>", None),
])
def test_extract_answer(response, expected):
  assert extract_answer(response) == expected


def test_normalize_text():
  assert normalize_text("  The Red, square! ") == "red square"
  assert normalize_text("An apple") == "apple"
  assert normalize_text(None) == ""


@pytest.mark.parametrize("response,answer,ok", [
    ("<answer>Red.</answer>", "red", True),
    ("<answer>the red</answer>", "red", True),
    ("<answer>blue</answer>", "red", False),
    ("<answer>57348</answer>", "57348", True),
    ("<answer>5734</answer>", "57348", False),
    ("", "red", False),
    (None, "red", False),
    ("<answer>  </answer>", "", False),
])
def test_verify_exact(response, answer, ok):
  assert verify_exact(response, answer) is ok
  assert verify(response, answer, "exact") is ok


@pytest.mark.parametrize("response,ok", [
    ("<answer>(B)</answer>", True), ("<answer>B.</answer>", True), ("answer: b", True),
    ("the answer is B", True), ("<answer>B) blue</answer>", True), ("<answer>blue</answer>", True),
    ("<answer>b</answer>", True), ("<answer>A</answer>", False), ("<answer>red</answer>", False),
    ("<answer>Because</answer>", False), ("<answer>(F)</answer>", False), ("", False),
    (None, False),
])
def test_verify_choice(response, ok):
  assert verify_choice(response, "B", ("red", "blue")) is ok
  assert verify(response, "B", "choice", choices=("red", "blue")) is ok


def test_verify_choice_reference_given_as_text():
  assert verify_choice("<answer>(B)</answer>", "blue", ("red", "blue"))
  assert not verify_choice("<answer>(A)</answer>", "blue", ("red", "blue"))


@pytest.mark.parametrize("text,value", [
    ("3", 3.0), ("1,000", 1000.0), ("-2.5", -2.5), ("three", 3.0), ("Twenty", 20.0),
    ("there are 4 red shapes", 4.0), ("1e3", 1000.0), (".5", 0.5), ("none", None), ("", None),
    (None, None),
])
def test_parse_number(text, value):
  assert parse_number(text) == value


@pytest.mark.parametrize("response,answer,ok", [
    ("<answer>5</answer>", "5", True), ("<answer>five</answer>", "5", True),
    ("<answer>5.0</answer>", "5", True), ("<answer>1,000</answer>", "1000", True),
    ("<answer>6</answer>", "5", False), ("<answer>many</answer>", "5", False),
    ("<answer>inf</answer>", "5", False), ("I count 3 shapes", "3", True), ("", "3", False),
])
def test_verify_number(response, answer, ok):
  assert verify_number(response, answer) is ok
  assert verify(response, answer, "number") is ok


def test_number_tolerance():
  assert not verify("<answer>10.5</answer>", "10", "number")
  assert verify("<answer>10.5</answer>", "10", "number", rel_tol=0.1)
  assert verify("<answer>10.5</answer>", "10", "number", abs_tol=0.5)
  assert verify("<answer>10.5</answer>", "10", "number", tol=0.5)


def test_unknown_answer_type_raises():
  with pytest.raises(ValueError, match="answer_type"):
    verify("x", "x", "regex")
