"""lm-eval's provenance lookups (harness.evaluation.quiet_git): silent without git, the environment once."""

from __future__ import annotations

import lm_eval.evaluator as evaluator

from harness.evaluation import quiet_git


def test_lm_evals_environment_lookup_runs_once_per_process(monkeypatch):
    # lm-eval records torch's collect_env (pip list and other subprocesses, ~0.7 s) in every evaluation;
    # the environment does not change within a process, so the second evaluation reuses the first's.
    calls = []

    def add_env_info(storage):
        calls.append(1)
        storage.update({"pretty_env_info": f"lookup {len(calls)}", "transformers_version": "x"})

    monkeypatch.setattr(evaluator, "add_env_info", add_env_info)
    monkeypatch.setattr(quiet_git, "_ENV_INFO", None)
    quiet_git.silence_lm_eval_git()
    quiet_git.silence_lm_eval_git()  # idempotent: not wrapped twice
    first, second = {"results": 1}, {}
    evaluator.add_env_info(first)
    evaluator.add_env_info(second)
    assert len(calls) == 1
    assert first == {"results": 1, "pretty_env_info": "lookup 1", "transformers_version": "x"}
    assert second == {"pretty_env_info": "lookup 1", "transformers_version": "x"}
    assert evaluator.get_git_commit_hash is quiet_git.quiet_git_commit_hash


def test_the_real_environment_lookup_is_kept(monkeypatch):
    monkeypatch.setattr(quiet_git, "_ENV_INFO", None)
    monkeypatch.setattr(evaluator, "add_env_info", evaluator.add_env_info)
    quiet_git.silence_lm_eval_git()
    storage: dict = {}
    evaluator.add_env_info(storage)
    assert "PyTorch version" in storage["pretty_env_info"] and storage["lm_eval_version"]
