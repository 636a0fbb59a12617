"""``Elastic`` and ``RunPolicy``: flytekit's fields and defaults, and a clear error for every bad value."""

from __future__ import annotations

import dataclasses
import pickle
import re

import pytest

import stalwart as sw
from stalwart.elastic import DEFAULT_RDZV_CONFIGS, Elastic, RunPolicy


def test_defaults_are_flytekits() -> None:
    elastic = Elastic()
    assert [(f.name, getattr(elastic, f.name)) for f in dataclasses.fields(Elastic)] == [
        ("nnodes", 1),
        ("nproc_per_node", 1),
        ("start_method", "spawn"),
        ("monitor_interval", 5),
        ("max_restarts", 0),
        ("rdzv_configs", {"timeout": 900, "join_timeout": 900}),
        ("increase_shared_mem", True),
        ("run_policy", None),
    ]
    assert (elastic.min_nodes, elastic.max_nodes) == (1, 1)
    assert (elastic.join_timeout, elastic.rdzv_timeout) == (900, 900)
    assert RunPolicy() == RunPolicy(None, None, None, None)


def test_public_names_and_task_attachment() -> None:
    assert sw.Elastic is Elastic and sw.RunPolicy is RunPolicy
    env = sw.TaskEnvironment(name="e", elastic=Elastic(nproc_per_node=2))

    def f() -> None: ...

    inherited = env.task(f)
    own = env.task(elastic=Elastic(nnodes="2:4"))(f)
    assert inherited.elastic == Elastic(nproc_per_node=2)
    assert own.elastic is not None and own.elastic.max_nodes == 4
    assert inherited.override(elastic=Elastic(max_restarts=3)).elastic == Elastic(max_restarts=3)
    assert sw.TaskEnvironment(name="plain").task(f).elastic is None
    with pytest.raises(ValueError, match=r"elastic=\{'nnodes': 2\} is not accepted; use stalwart.Elastic"):
        env.task(elastic={"nnodes": 2})(f)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="elastic=2 is not accepted"):
        sw.TaskEnvironment(name="e", elastic=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="elastic='x' is not accepted"):
        inherited.override(elastic="x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("nnodes", "low", "high"),
    [(1, 1, 1), (4, 4, 4), ("2:4", 2, 4), (" 1 : 8 ", 1, 8), ("3:3", 3, 3), ("4", 4, 4)],
)
def test_nnodes_parsing(nnodes: int | str, low: int, high: int) -> None:
    elastic = Elastic(nnodes=nnodes)
    assert (elastic.min_nodes, elastic.max_nodes) == (low, high)
    assert elastic.nnodes == nnodes  # kept as given, like flytekit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"nnodes": "4:2"},
            "nnodes='4:2': min 4 is larger than max 2; use 'min:max' with min <= max, or an int",
        ),
        ({"nnodes": 0}, "nnodes=0 is not accepted; use an int >= 1 or 'min:max'"),
        ({"nnodes": -1}, "nnodes=-1 is not accepted"),
        ({"nnodes": "0:2"}, "nnodes='0:2': node counts must be >= 1"),
        ({"nnodes": "2:"}, "nnodes='2:' is not accepted"),
        ({"nnodes": "a:b"}, "nnodes='a:b' is not accepted"),
        ({"nnodes": "1:2:3"}, "nnodes='1:2:3' is not accepted"),
        ({"nnodes": 2.0}, "nnodes=2.0 is not accepted"),
        ({"nnodes": True}, "nnodes=True is not accepted"),
        ({"nproc_per_node": 0}, "nproc_per_node=0 is not accepted; use an int >= 1"),
        ({"nproc_per_node": "2"}, "nproc_per_node='2' is not accepted"),
        ({"nproc_per_node": True}, "nproc_per_node=True is not accepted"),
        ({"start_method": "forkserver"}, "start_method='forkserver' is not accepted; use 'spawn' or 'fork'"),
        ({"monitor_interval": 0}, "monitor_interval=0 is not accepted; use a number of seconds > 0"),
        ({"monitor_interval": -1.5}, "monitor_interval=-1.5 is not accepted"),
        ({"monitor_interval": float("inf")}, "monitor_interval=inf is not accepted; use a finite number"),
        ({"monitor_interval": "5"}, "monitor_interval='5' is not accepted"),
        ({"max_restarts": -1}, "max_restarts=-1 is not accepted; use an int >= 0"),
        ({"max_restarts": 1.0}, "max_restarts=1.0 is not accepted"),
        ({"rdzv_configs": [("timeout", 1)]}, "rdzv_configs=.* is not accepted; use a dict"),
        (
            {"rdzv_configs": {"join_timeout": 0}},
            r"rdzv_configs\['join_timeout'\]=0 is not accepted; use a whole",
        ),
        ({"rdzv_configs": {"timeout": 1.5}}, r"rdzv_configs\['timeout'\]=1.5 is not accepted"),
        ({"rdzv_configs": {"last_call_timeout": "30"}}, r"rdzv_configs\['last_call_timeout'\]='30'"),
        ({"rdzv_configs": {1: 2}}, "rdzv_configs key 1 is not accepted"),
        ({"rdzv_configs": {"x": [1]}}, r"rdzv_configs\['x'\]=\[1\] is not accepted; values are str"),
        ({"increase_shared_mem": 1}, "increase_shared_mem=1 is not accepted; use a bool"),
        ({"run_policy": {"backoff_limit": 1}}, "run_policy=.* is not accepted; use stalwart.RunPolicy"),
    ],
)
def test_bad_elastic_values_name_the_field_and_what_is_accepted(kwargs: dict, message: str) -> None:
    with pytest.raises(
        ValueError, match=message if "\\" in message or ".*" in message else re.escape(message)
    ):
        Elastic(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"clean_pod_policy": "none"},
            "clean_pod_policy='none' is not accepted; use one of 'None', 'Running'",
        ),
        ({"clean_pod_policy": None}, None),
        (
            {"ttl_seconds_after_finished": -1},
            "ttl_seconds_after_finished=-1 is not accepted; use an int >= 0",
        ),
        ({"ttl_seconds_after_finished": 0}, None),
        ({"active_deadline_seconds": 0}, "active_deadline_seconds=0 is not accepted; use an int >= 1"),
        ({"active_deadline_seconds": 2**31}, "active_deadline_seconds=2147483648 is not accepted"),
        ({"backoff_limit": -2}, "backoff_limit=-2 is not accepted; use an int >= 0"),
        ({"backoff_limit": "3"}, "backoff_limit='3' is not accepted"),
    ],
)
def test_run_policy_values(kwargs: dict, message: str | None) -> None:
    if message is None:
        assert RunPolicy(**kwargs)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        RunPolicy(**kwargs)


def test_rdzv_configs_merge_over_the_defaults_without_sharing_state() -> None:
    given = {"join_timeout": 30, "last_call_timeout": 5}
    elastic = Elastic(rdzv_configs=given)
    assert elastic.rdzv_configs == {"timeout": 900, "join_timeout": 30, "last_call_timeout": 5}
    assert elastic.join_timeout == 30 and elastic.rdzv_timeout == 900
    given["join_timeout"] = 1
    assert elastic.join_timeout == 30  # a copy, not the caller's dict
    assert Elastic(rdzv_configs={"timeout": 60}).rdzv_configs == {"timeout": 60, "join_timeout": 900}
    assert dict(DEFAULT_RDZV_CONFIGS) == {"timeout": 900, "join_timeout": 900}
    with pytest.raises(TypeError):
        DEFAULT_RDZV_CONFIGS["timeout"] = 1  # type: ignore[index]


def test_frozen_and_picklable() -> None:
    elastic = Elastic(nnodes="2:4", nproc_per_node=8, run_policy=RunPolicy(clean_pod_policy="All"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        elastic.nnodes = 3  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(elastic)) == elastic


def test_import_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, stalwart as sw; sw.Elastic(nnodes='1:2'); sw.RunPolicy()\n"
        "print(sorted({'torch', 'kubernetes', 'yaml'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
