"""Quality gates: parsing, the `shipped` model, missing metrics, and the defaults on the demo's figures."""

import pytest

from tunekit.gates import Gate, GateError, describe, evaluate_gates, failures
from tunekit.params import ExportParams, ParamsError, validate_section
from tunekit.tasks import TASKS

assert ExportParams().gates is None  # null in params: the task kind's own gates
DEFAULT_GATES = TASKS["sft"].gates({})


def demo_metrics(tuned: float, forgetting: float = 0.049) -> dict:
    """The figures of the demo pipeline (dvc.lock of the default run): exact match base 0.00, 3-shot 0.58,
    tuned and merged 1.00, forgetting +4.9 % on the pydoc probe; `tuned` replaces the tuned scores."""
    return {"evaluate": {"base": {"exact_match": 0.0}, "few_shot": {"exact_match": 0.58},
                         "tuned": {"exact_match": tuned}, "merged": {"exact_match": tuned}},
            "forgetting": {"merged": {"relative_loss_change": forgetting}, "tuned": {"relative_loss_change": forgetting}}}


def test_the_default_gates_pass_the_demo_model_and_stop_one_that_did_not_learn():
    assert failures(evaluate_gates(DEFAULT_GATES, demo_metrics(1.0), "merged")) == []
    # A model that learned nothing scores what the base scores.
    failed = failures(evaluate_gates(DEFAULT_GATES, demo_metrics(0.0), "merged"))
    assert [f["gate"] for f in failed] == ["learned", "beats_few_shot"]
    assert describe(failed[0]) == ("learned: evaluate.merged.exact_match >= evaluate.base.exact_match + 0.2: "
                                   "0 >= 0.2 is false")
    # Learned, but at the price of general ability.
    assert [f["gate"] for f in failures(evaluate_gates(DEFAULT_GATES, demo_metrics(1.0, 0.3), "merged"))] == ["forgetting"]


def test_shipped_names_the_tuned_model_when_nothing_was_merged_and_missing_metrics_fail():
    metrics = demo_metrics(1.0)
    del metrics["evaluate"]["merged"]
    results = evaluate_gates(DEFAULT_GATES, metrics, "tuned")
    assert next(r["rule"] for r in results) == "evaluate.tuned.exact_match >= evaluate.base.exact_match + 0.2"
    assert failures(results) == []
    missing = evaluate_gates({"accuracy": "evaluate.shipped.accuracy >= 0.9"}, metrics, "merged")[0]
    assert missing["verdict"] == "not measured" and missing["missing"] == ["evaluate.merged.accuracy"]
    assert "not measured (no evaluate.merged.accuracy in the metrics)" in describe(missing)


@pytest.mark.parametrize("expression, parsed", [
    ("a.b >= 0.5", ("a.b", ">=", None, 0.5)),
    ("a.b.c < a.d - 1e-2", ("a.b.c", "<", "a.d", -0.01)),
    ("evaluate.shipped.exact_match > evaluate.few_shot.exact_match", ("evaluate.shipped.exact_match", ">", "evaluate.few_shot.exact_match", 0.0)),
])
def test_gate_expressions_parse(expression, parsed):
    gate = Gate.parse("g", expression)
    assert (gate.metric, gate.op, gate.other, gate.offset) == parsed


def test_bad_gates_are_reported_with_their_name_at_params_validation():
    with pytest.raises(GateError, match="gate 'x'"):
        Gate.parse("x", "exact_match high")
    with pytest.raises(ParamsError) as error:
        validate_section("export", {"gates": {"learned": "evaluate.merged.exact_match => 1", "ok": "a.b <= 1"},
                                    "gguf": {"q4_k_m": {}, "q8_0": {"max_kl": 0.01}}, "modelfile_from": "f16"},
                         ExportParams)
    text = str(error.value)
    assert "export.gates" in text and "gate 'learned'" in text and "'ok'" not in text
    assert "'q4_k_m' is no precision" in text and "q8_0 needs max_kl and max_perplexity_change" in text


@pytest.mark.parametrize("kind, metric", [("classification", "accuracy"), ("token_classification", "entity_f1"),
                                          ("qa", "squad_f1"), ("regression", "pearson")])
def test_each_head_kinds_default_gate_passes_a_head_that_learned_and_stops_an_untrained_one(kind, metric):
    gates = TASKS[kind].gates({"type": kind})
    assert sorted(gates) == ["learned", "not_collapsed"]
    learned = {"evaluate": {"base": {metric: 0.31}, "merged": {metric: 0.93, "collapsed": 0}}}
    untrained = {"evaluate": {"base": {metric: 0.31}, "merged": {metric: 0.35, "collapsed": 0}}}
    # a model that predicts one label everywhere can still beat the untrained head's main metric: it does not ship
    collapsed = {"evaluate": {"base": {metric: 0.31}, "merged": {metric: 0.93, "collapsed": 1}}}
    assert failures(evaluate_gates(gates, learned, "merged")) == []
    assert [f["gate"] for f in failures(evaluate_gates(gates, untrained, "merged"))] == ["learned"]
    assert [f["gate"] for f in failures(evaluate_gates(gates, collapsed, "merged"))] == ["not_collapsed"]


def test_multi_task_gates_hold_every_tasks_head_to_its_own_metric():
    task_meta = {"type": "multi_task", "tasks": {"topic": {"type": "classification"}, "ner": {"type": "token_classification"}}}
    gates = TASKS["multi_task"].gates(task_meta)
    assert sorted(gates) == ["learned_ner", "learned_topic", "not_collapsed_ner", "not_collapsed_topic"]
    metrics = {"evaluate": {"base": {"topic": {"accuracy": 0.25}, "ner": {"entity_f1": 0.0}},
                            "merged": {"topic": {"accuracy": 1.0, "collapsed": 0}, "ner": {"entity_f1": 0.05, "collapsed": 1}}}}
    assert [f["gate"] for f in failures(evaluate_gates(gates, metrics, "merged"))] == ["learned_ner", "not_collapsed_ner"]
