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


@pytest.mark.parametrize("name", list(SPECS))
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
