"""What a user installs and runs: the README's code parts on this venv (built from
integration/verl/requirements.txt), and a missing optional part of verl as a clear error at the
point of use."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

README = REPO / "integration" / "verl" / "README.md"
PYTHONPATH = os.pathsep.join([str(REPO / "bindings" / "python"), os.environ.get("PYTHONPATH", "")])


def _blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _run(*args, code=None):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    cmd = [sys.executable, *(["-c", code] if code is not None else args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_readme_command_composes_with_verls_config():
    """The README's launch command as a user's shell runs it (bash: quoting, brace expansion),
    with Hydra's ``--cfg job`` and the two data paths verl requires: verl's config composes
    every override, and the default V1 trainer is what runs."""
    (block,) = [b for b in _blocks(README.read_text(), "sh") if "calibrl.integrations.verl_main" in b]
    lines = [line for line in block.splitlines() if not line.strip().startswith("#")]
    command = "\n".join(lines).strip().rstrip("\\")
    assert command.startswith("python -m calibrl.integrations.verl_main")
    # Hydra's --cfg before the overrides (argparse takes one run of positionals)
    command = command.replace("python -m calibrl.integrations.verl_main",
                              f"{sys.executable} -m calibrl.integrations.verl_main --cfg job", 1)
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    out = subprocess.run(["bash", "-c", command + " data.train_files=x.parquet data.val_files=x.parquet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("adv_estimator: grpo", "norm_adv_by_std_in_grpo: false", "loss_mode: calibrl",
                 "_target_: calibrl.integrations.verl.CalibRLPolicyLossConfig", "use_v1: true"):
        assert line in out.stdout, line
    assert re.search(r"calibrl:\n\s+preset: paper\n\s+lambda: 0.1\n\s+alpha: 0.5", out.stdout)


def test_readme_entry_module_lines_run(monkeypatch):
    """The README's lines for your own entry module call verl's run_ppo with CalibRL's task
    runner (a Ray actor class over verl's TaskRunnerV1)."""
    import verl.trainer.main_ppo as main_ppo

    import calibrl.integrations.verl as cv

    calls = []
    monkeypatch.setattr(main_ppo, "run_ppo", lambda config, task_runner_class: calls.append(task_runner_class))
    (code,) = [b for b in _blocks(README.read_text(), "python") if "run_ppo" in b]
    exec(code, {"config": object()})
    (runner,) = calls
    assert issubclass(runner.__ray_metadata__.modified_class, cv.CalibRLTaskRunnerV1)


def test_requirements_install_what_the_drop_in_imports():
    """Every verl class the README names builds on this venv (verl's optional parts included)."""
    import calibrl.integrations.verl as cv

    for name in ("CalibRLPolicyLossConfig", "CalibRLActorRolloutRefWorker", "CalibRLTaskRunnerV1"):
        assert getattr(cv, name).__module__ == cv.__name__
    import verl.trainer.main_ppo_v0  # noqa: F401  (the deprecated path: RayPPOTrainer needs cachetools)
    import verl.trainer.ppo.v1  # noqa: F401  (the V1 trainer: TransferQueue)


@pytest.mark.parametrize("module, name, package", [
    ("transfer_queue", "CalibRLTaskRunnerV1", "TransferQueue==0.1.10"),
    ("verl", "CalibRLActorRolloutRefWorker", "verl==0.9.1"),
    ("verl", "CalibRLPolicyLossConfig", "verl==0.9.1"),
])
def test_a_missing_optional_package_is_an_error_at_the_point_of_use(module, name, package):
    """Without the package the drop-in still imports (the loss needs no verl types); the class
    that needs it raises ImportError naming the package and the install command."""
    code = f"""
import sys
sys.modules[{module!r}] = None  # not installed
import calibrl.integrations.verl as cv
try:
    cv.{name}
except ImportError as e:
    print("ERROR:", e)
else:
    print("NO ERROR")
"""
    out = _run(code=code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ERROR:" in out.stdout, out.stdout
    assert f"`{package}`" in out.stdout and "pip install -r integration/verl/requirements.txt" in out.stdout
    assert "AttributeError" not in out.stdout


def test_the_entry_point_without_verl_names_it():
    out = _run(code="import sys; sys.modules['verl'] = None; import calibrl.integrations.verl_main")
    assert out.returncode != 0
    assert "`verl==0.9.1`" in out.stderr and "pip install -r integration/verl/requirements.txt" in out.stderr
