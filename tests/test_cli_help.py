"""Issue 14 item 19: `--help` of every CLI shows each default once, and every flag has a
description and a default (a flag without a value: "(default: off)")."""
from __future__ import annotations

import argparse
import importlib
import re

import pytest

CLIS = ["generate", "calibrate", "perplexity", "evaluate_generation", "quantize", "tp",
        "scripts.prepare", "scripts.download", "scripts.convert_hf_checkpoint",
        "scripts.convert_gguf_checkpoint", "scripts.export_hf_from_gguf", "scripts.bench_gemv",
        "scripts.bench_decode", "scripts.bench_tp", "scripts.bench_compare",
        "scripts.kernel_sass", "scripts.plot_sparsity"]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a CLI's main() builds (caught at its parse_args call)."""
    mod = importlib.import_module(module_name)

    def capture(self, args=None, namespace=None):
        raise _Captured(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    try:
        mod.main([])
    except _Captured as c:
        return c.parser
    raise AssertionError(f"{module_name}.main() built no argparse parser")


def _help_of(parser, action) -> str:
    fmt = parser._get_formatter()
    return fmt._expand_help(action) if action.help else ""


@pytest.mark.parametrize("name", CLIS)
def test_every_flag_has_help_and_one_default(name, monkeypatch):
    parser = parser_of(name, monkeypatch)
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = "/".join(action.option_strings) or action.dest
        text = _help_of(parser, action)
        if not text.strip() or not re.sub(r"\(default:[^)]*\)", "", text).strip():
            problems.append(f"{flag}: no description")
        n = len(re.findall(r"default", text, flags=re.I))
        needs_default = action.option_strings and not action.required
        if needs_default and n != 1:
            problems.append(f"{flag}: 'default' {n} times in {text!r}")
        if not needs_default and n > 1:
            problems.append(f"{flag}: 'default' {n} times in {text!r}")
        if "(default: None)" in text:
            problems.append(f"{flag}: says (default: None)")
    assert not problems, f"{name} --help:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", CLIS)
def test_help_runs(name, monkeypatch, capsys):
    mod = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "(default: None)" not in out
