"""The install examples (the Makefile's TORCH_SPEC_* lines, quoted by the README) resolve with pip.

Each example is resolved by launch/check_install.py as ``make install`` installs it (the torch spec,
then deepspeed and ppcr[dev] on top), in a dry run; an example whose index this machine cannot reach
is skipped with the reason, never passed.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("check_install", ROOT / "launch/check_install.py")
check_install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_install)
SPECS = check_install.torch_specs()


def test_readme_quotes_the_makefiles_torch_specs_and_no_others():
    readme = (ROOT / "README.md").read_text()
    for name, spec in SPECS.items():
        assert f"TORCH={name}" in readme and f"`{spec}`" in readme, name
    quoted = re.findall(r"`(torch==[^`]*)`", readme)  # every torch pin the README shows
    assert quoted and set(quoted) <= set(SPECS.values()), set(quoted) - set(SPECS.values())
    assert {"pypi", "cu12", "cpu"} <= set(SPECS)


def test_an_index_that_does_not_answer_is_skipped_not_passed():
    r = check_install.check("nowhere", "torch==2.14.1 --index-url http://127.0.0.1:9/simple")
    assert r["status"] == "skipped" and "http://127.0.0.1:9/simple does not answer" in r["reason"]


def _pypi_or_skip():
    why = check_install.unreachable(check_install.PYPI)
    if why:
        pytest.skip(f"cannot resolve here: {why}")


@pytest.mark.parametrize("name", ["pypi"])  # make install's default; make check-install resolves every example
def test_install_example_resolves(name):
    _pypi_or_skip()
    r = check_install.check(name, SPECS[name])
    if r["status"] == "skipped":
        pytest.skip(f"TORCH={name} not checked here: {r['reason']}")
    assert r["status"] == "ok", r.get("reason")
    pins = dict(re.findall(r"(torch|torchvision)==(\S+)", SPECS[name]))
    assert {k: v.split("+")[0] for k, v in r["versions"].items() if k in pins} == pins
    assert "deepspeed" in r["versions"] and "transformers" in r["versions"]


def test_a_torchvision_for_another_torch_fails_to_resolve():
    """The check can fail: torchvision 0.29.1 is built for torch 2.14.1 only (it pins it)."""
    _pypi_or_skip()
    r = check_install.check("mismatch", "torch==2.10.0 torchvision==0.29.1")
    assert r["status"] == "failed" and "does not resolve" in r["reason"]


def _requirements():
    import configparser

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["dev"].splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def test_the_constraints_pin_every_dependency_within_setup_cfgs_bounds():
    """constraints.txt (make install LOCKED=1) holds a version of every dependency but torch and torchvision
    (TORCH_SPEC picks them), each inside setup.cfg's bounds; this environment's versions are inside them too."""
    from importlib.metadata import version

    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[canonicalize_name(name)] = pinned.strip()
    assert not {"torch", "torchvision"} & set(pins)
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in ("torch", "torchvision"):
            continue
        assert name in pins, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {req.name}=={pins[name]}: {req}"
        assert req.specifier.contains(version(req.name), prereleases=True), f"installed {req.name} {version(req.name)}"


def test_make_install_locked_installs_under_the_constraints():
    import subprocess

    def dry(*args):
        out = subprocess.run(
            ["make", "-n", "-B", "install", "PY=python", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if "pip install" in line]

    locked = dry("LOCKED=1")
    assert [("-c constraints.txt" in line) for line in locked] == [False, False, True, True]  # pip, torch; ds, ppcr
    assert "deepspeed" in locked[2] and "-e '.[dev]'" in locked[3]
    assert not any("-c constraints.txt" in line for line in dry())
