"""Metrics on hand-made predictions, including malformed outputs."""
import pytest

from pipeline.evaluate import metrics as M


def test_exact_match_normalizes_but_is_exact():
    assert M.exact_match("case 3.", "Case 3") and M.exact_match("  Case   3 ", "Case 3")
    assert not M.exact_match("Case 30", "Case 3") and not M.exact_match("Case3", "Case 3")
    assert not M.exact_match(None, "Case 3") and not M.exact_match("", "")  # no answer is never right
    assert M.accuracy([True, False, False, True]) == 50.0 and M.accuracy([]) is None
    assert M.accuracy([1, 0, 0]) == 33.33


def test_choice_match_letters_and_text():
    ch = ["red", "blue", "green"]
    assert M.choice_match("B", "blue", ch) and M.choice_match("(b)", "B", ch) and M.choice_match("Blue", "B", ch)
    assert not M.choice_match("D", "D", ch)  # out-of-range letter is not an option
    assert not M.choice_match("A", "B", ch) and not M.choice_match(None, "B", ch)
    assert M.choice_match("7", "7", None)


def test_grouped_accuracy_natural_order():
    rows = [{"d": 10, "correct": True}, {"d": 2, "correct": False}, {"d": 2, "correct": True}]
    assert list(M.grouped_accuracy(rows, "d").items()) == [("2", 50.0), ("10", 100.0)]


def test_cited_conditions_and_gold_path_encodings():
    text = "By Condition 1 the cube exists, so see condition 1.2. Condition 1 again; Condition 1.2.1 holds."
    assert M.cited_conditions(text) == ["1", "1.2", "1.2.1"]
    assert M.cited_conditions(None) == [] and M.cited_conditions("<think>garbage") == []
    assert M.gold_path_ids([["1", True], ["1.1", False]]) == ["1", "1.1"]
    assert M.gold_path_ids([{"id": "1"}, {"condition": "Condition 1.2"}]) == ["1", "1.2"]
    assert M.gold_path_ids(["1", "1.2"]) == ["1", "1.2"] and M.gold_path_ids(None) == []


def test_referral_scores_on_crafted_responses():
    gold = ["1", "1.1"]
    examples = [
        (M.cited_conditions("Condition 1 true, then Condition 1.1 false -> Case 2"), gold),  # perfect
        (M.cited_conditions("Condition 1 then Condition 1.2 then Condition 9.9"), gold),     # wrong branch + bogus id
        (M.cited_conditions("\\boxed{Case 2}"), gold),                                       # cites nothing
    ]
    r = M.referral_scores(examples, known_ids=[["1", "1.1", "1.2"]] * 3)
    # cited: {1,1.1} + {1,1.2,9.9} = 5 citations, 3 on the path; gold ids 6, 3 cited
    assert r["precision"] == 60.0 and r["recall"] == 50.0
    assert r["exact_path"] == 33.33 and r["nonexistent_ids"] == 20.0 and r["cited_per_response"] == pytest.approx(5 / 3, abs=1e-3)
    assert M.referral_scores([])["precision"] is None


def test_branching_error_is_mean_abs_difference_of_citation_rates():
    gold = [("P", ["1", "1.1"]), ("P", ["1", "1.2"])]
    assert M.branching_error(gold, gold) == 0.0
    # gold rates: 1 -> 100, 1.1 -> 50, 1.2 -> 50. model: 1 -> 100, 1.1 -> 100, 2 -> 50
    model = [("P", ["1", "1.1"]), ("P", ["1", "1.1", "2"])]
    assert M.branching_error(model, gold) == round((0 + 50 + 50 + 50) / 4, 2)
    # ids are per policy: the same id under another policy is a different rule
    assert M.branching_error([("Q", ["1"])], [("P", ["1"])]) == 100.0
    assert M.branching_error([("P", [])], [("P", [])]) is None


def test_drop_reduction_mean_flatten_dotted():
    from pipeline.config import flatten, get_dotted

    assert M.drop(50.0, 42.5) == 7.5 and M.drop(None, 3) is None
    assert M.reduction_pct(1000, 61) == 93.9 and M.reduction_pct(0, 1) is None
    assert M.mean([10, None, 20]) == 15.0 and M.mean([None]) is None
    m = {"main": {"score": 1, "by_depth": {"2": 3}}, "n": [1, 2]}
    assert flatten(m) == {"main.score": 1, "main.by_depth.2": 3, "n": [1, 2]}
    assert get_dotted(m, "main.by_depth.2") == 3 and get_dotted(m, "main.x") is None
    assert get_dotted(m, "n.x") is None
