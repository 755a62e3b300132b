"""Parameter grids (``"params"``), the seed of each run, replay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory, alma_cli, listing

import alma
import alma.experiment

LOGGING_RUN = """
import json, os

def run(instance, save_callback, state, iteration, a, b="-"):
    with open(os.path.join(os.path.dirname(instance), "..", "calls.log"), "a") as f:
        f.write(json.dumps([os.path.basename(instance), a, b, iteration]) + "\\n")
    return {"score": a * 10 + iteration}
"""


def _calls(exp: Path) -> list[list[Any]]:
    log = exp.parent / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _set(exp: Path, **fields: Any) -> None:
    data = json.loads(exp.read_text())
    data.update(fields)
    exp.write_text(json.dumps(data))


def _run(exp: Path) -> Any:
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60) is True, d.last_error
    return d


def test_a_grid_runs_every_configuration_on_every_instance(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(
        LOGGING_RUN, instances=2, iterations=2, params={"a": [1, 2], "b": ["x", "y"]}
    )
    d = _run(exp)
    assert d.progress.total == 2 * 4 * 2 and d.progress.done == 16
    calls = _calls(exp)
    assert sorted(map(tuple, calls)) == sorted(
        (f"file{i}.txt", a, b, it)
        for i in range(2)
        for a in (1, 2)
        for b in ("x", "y")
        for it in range(2)
    )
    # Round-robin over (instance, configuration) pairs: iteration 0 of every pair first.
    assert {c[3] for c in calls[:8]} == {0}
    r = d.results
    assert list(r.columns[:5]) == ["instance", "iteration", "a", "b", "seed"]
    assert (r["score"] == r["a"] * 10 + r["iteration"]).all()
    state = d.state
    assert list(state.columns[:3]) == ["instance", "a", "b"] and len(state) == 8
    assert (state["done"] == 2).all()
    per = d.configs
    assert len(per) == 4 and (per["done"] == 4).all()


def test_a_list_of_configurations_and_duplicates_dropped(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(
        LOGGING_RUN,
        instances=1,
        iterations=1,
        params=[{"a": 1}, {"a": 2, "b": "z"}, {"a": 1}],
    )
    d = _run(exp)
    assert sorted(map(tuple, _calls(exp))) == [("file0.txt", 1, "-", 0), ("file0.txt", 2, "z", 0)]
    r = d.results.sort_values("a")
    assert r["b"].tolist()[1] == "z" and r["b"].isna().tolist()[0]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"instance": [1]}, "parameter name 'instance' is reserved"),
        ({"seed": [1]}, "parameter name 'seed' is reserved"),
        ({"a": []}, "parameter 'a' has an empty list of values"),
        ({"a": 3}, "parameter 'a': expected a list of values"),
        ([], "the list of configurations is empty"),
        ([{"a": 1}, 2], "configuration 1 is 2, not an object"),
        ("a=1", "expected an object or a list of objects"),
        ({"not a name": [1]}, "is not a Python identifier"),
    ],
)
def test_malformed_params_are_config_errors_naming_the_field(
    make_experiment: ExperimentFactory, params: Any, needle: str
) -> None:
    exp = make_experiment(LOGGING_RUN, params=params)
    before = listing(exp.parent)
    with pytest.raises(alma.ConfigError) as info:
        alma.experiment.load(exp)
    assert "'params'" in str(info.value) and needle in str(info.value)
    assert str(exp) in str(info.value)
    assert listing(exp.parent) == before  # nothing written


def test_a_required_parameter_missing_from_a_configuration_is_named(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(LOGGING_RUN, params=[{"a": 1}, {"b": "x"}])
    with pytest.raises(alma.ConfigError, match=r"requires a parameter 'a'.*\{\"b\":\"x\"\}"):
        alma.experiment.load(exp)
    with pytest.raises(alma.ConfigError, match="requires a parameter 'a' that alma cannot"):
        alma.experiment.load(make_experiment(LOGGING_RUN, name="nogrid"))


def test_extending_and_shrinking_the_grid_between_sessions(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(LOGGING_RUN, instances=2, iterations=1, params={"a": [1, 2]})
    _run(exp).close()
    assert len(_calls(exp)) == 4
    _set(exp, params={"a": [1, 2, 3]})  # a new value: only its runs
    d = _run(exp)
    assert sorted(c[1] for c in _calls(exp)[4:]) == [3, 3]
    assert d.progress.total == 6 and d.progress.done == 6
    d.close()
    _set(exp, params={"a": [3, 1]})  # a removed value keeps its results, is not scheduled
    d = alma.experiment.load(exp)
    assert d.finished and d.progress.total == 4
    assert sorted(d.results["a"].unique().tolist()) == [1, 2, 3]
    assert sorted(d.state["a"].unique().tolist()) == [1, 3]
    d.start()
    assert d.join(timeout=30) is True
    assert len(_calls(exp)) == 6  # nothing ran again


def test_the_seed_is_the_documented_derivation_and_follows_the_experiment_seed(
    make_experiment: ExperimentFactory,
) -> None:
    import hashlib

    exp = make_experiment(
        "def run(instance, save_callback, state, seed):\n    return seed\n",
        instances=2,
        iterations=3,
    )
    r = _run(exp).results
    text = json.dumps([0, "data/file1.txt", {}, 2], separators=(",", ":"))
    documented = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest()) >> 1
    row = r[(r["instance"] == "data/file1.txt") & (r["iteration"] == 2)]
    assert row["seed"].item() == row["result"].item() == documented
    assert r["seed"].nunique() == 6 and (r["seed"] == r["result"]).all()
    assert ((r["seed"] >= 0) & (r["seed"] < 2**63)).all()
    other = make_experiment(
        "def run(instance, save_callback, state, seed):\n    return seed\n",
        instances=2,
        iterations=3,
        name="seeded",
        seed=1,
    )
    assert set(_run(other).results["seed"]).isdisjoint(r["seed"])


def test_replay_gives_the_stored_result_and_writes_nothing(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(
        """
        import random

        def run(instance, save_callback, state, iteration, seed, a):
            if a == 0:
                raise ZeroDivisionError("a is 0")
            return {"x": random.Random(seed).random() * a, "it": iteration}
        """,
        instances=2,
        iterations=2,
        params={"a": [0, 2]},
    )
    d = _run(exp)
    r = d.results
    stored = r[(r["instance"] == "data/file1.txt") & (r["iteration"] == 1) & (r["a"] == 2)]
    before = listing(exp.parent)
    again = d.replay("data/file1.txt", 1, a=2)
    assert again == {"x": stored["x"].item(), "it": 1}
    with pytest.raises(ZeroDivisionError, match="a is 0"):
        d.replay("data/file0.txt", 0, a=0)
    with pytest.raises(alma.ConfigError, match="no configuration"):
        d.replay("data/file0.txt", 0, a=5)
    with pytest.raises(alma.ConfigError, match=r"no instance 'file0'.*data/file0\.txt"):
        d.replay("file0", 0, a=2)
    assert listing(exp.parent) == before
    d.close()
    out = alma_cli("replay", exp, "data/file1.txt", "1", "--param", "a=2")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == again
    failed = alma_cli("replay", exp, "data/file0.txt", "0", "--param", "a=0")
    assert failed.returncode == 1 and "ZeroDivisionError: a is 0" in failed.stderr


def test_experiment_in_code_takes_params_and_seed(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("a")

    def variant(instance, save_callback, state, k, seed):  # type: ignore[no-untyped-def]
        return k

    d = alma.Experiment(run=variant, instances=["a.txt"], params={"k": [1, 2]}, seed=3)
    d.start()
    assert d.join(timeout=30)
    assert sorted(d.results["result"]) == [1, 2]
    assert set(d.results["seed"]) == {alma.run_seed("a.txt", 0, {"k": k}, 3) for k in (1, 2)}
    d.close()
