"""The README names only what exists: every ppcr-* console command it names is declared in setup.cfg and its
--help runs, every launch/*.py script it runs answers --help, and every `make` target it names is a rule of
the Makefile. The settings list of --help covers every config key."""

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

from ppcr.config import settings

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()

HELP = r"""
import contextlib, importlib, io, json, runpy, sys
out = {}
for name, target in json.loads(sys.argv[1]).items():
    buf, code = io.StringIO(), "returned"
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            if target.endswith(".py"):
                sys.argv = [target, "--help"]
                runpy.run_path(target, run_name="__main__")
            else:
                module, func = target.split(":")
                getattr(importlib.import_module(module), func)(["--help"])
        except SystemExit as e:
            code = e.code
    out[name] = [code, buf.getvalue()]
print("HELP " + json.dumps(out))
"""


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_every_command_the_readme_names_exists_and_answers_help():
    declared = console_scripts()
    named = set(re.findall(r"\b(ppcr-[a-z]+)\b", README))
    assert named >= {"ppcr-export", "ppcr-infer", "ppcr-rescore", "ppcr-demo"}
    assert named <= set(declared), f"named in the README but not installed: {sorted(named - set(declared))}"
    scripts = sorted(set(re.findall(r"\b(launch/[a-z_]+\.py)\b", README)))
    assert "launch/train.py" in scripts and all((ROOT / s).is_file() for s in scripts), scripts
    targets = {**{n: declared[n] for n in named}, **{s: s for s in scripts}}
    done = subprocess.run(
        [sys.executable, "-c", HELP, json.dumps(targets)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    helped = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("HELP "))[5:])
    for name, (code, text) in helped.items():
        assert code == 0 and "usage:" in text, (name, code, text[-1500:])
    for script in ("launch/train.py", "launch/eval.py"):  # every key, with its type, default and doc
        text = helped[script][1]
        for s in settings():
            assert (f"{s.key}: " if s.section else f"  {s.key} ({s.type}; default ") in text, (script, s.key)


def test_every_make_target_the_readme_names_is_a_rule():
    named = sorted(set(re.findall(r"\bmake ([a-z][a-z-]*)", README)))
    assert {"train", "test", "eval", "install"} <= set(named)
    for target in named:
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip(), (target, done.stderr)
