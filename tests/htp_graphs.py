"""Helpers for the HTP legalisation passes' tests: a function as the portable program rc.build
compiles, its op counts, and its values before and after a pass."""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

from rehyat_compile.backends.portable import portable_program
from test_canonicalize import Fn  # a function as an nn.Module

aten = torch.ops.aten


def portable(fn, *args) -> torch.export.ExportedProgram:
    """``fn(*args)`` as rc.build's portable program (core aten + the hybrid op decomposed)."""
    module = fn if isinstance(fn, nn.Module) else Fn(fn)
    return portable_program(module.eval(), args)


def targets(program) -> Counter:
    return Counter(n.target for n in program.graph_module.graph.nodes if n.op == "call_function")


def ranks(program) -> list[int]:
    """Rank of every call_function node's tensor output."""
    return [n.meta["val"].dim() for n in program.graph_module.graph.nodes
            if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]


def rewritten(program, rewrite) -> tuple[torch.export.ExportedProgram, int]:
    """(a copy of ``program`` after ``rewrite(graph) -> count``, count); the original is untouched."""
    after = copy.deepcopy(program)
    count = rewrite(after.graph_module.graph)
    after.graph_module.graph.lint()
    after.graph_module.recompile()
    return after, count


def run(program, *args):
    with torch.no_grad():
        return program.module()(*args)
