"""Sympy helpers for costs that are expressions in the number of latent frames ``T``.

Shapes in ``torch.export`` graphs are sympy expressions over the export's own symbols and torch's
integer functions (``FloorDiv``, ``Mod``, ...). :func:`to_standard` turns them into plain sympy;
:func:`growth_polynomial` finds a polynomial with the same growth as ``T -> oo`` (floors and
ceilings dropped, ``Min``/``Max`` resolved to the asymptotically smaller/larger argument), so that
:func:`degree` works on hybrid-attention formulas too; :func:`upper_envelope` keeps the maximum of
many expressions small by dropping those another one dominates for every ``T >= 0``.
"""
from __future__ import annotations

import sympy
import torch
from torch.utils._sympy import functions as torch_sympy

T = sympy.Symbol("T", integer=True, positive=True)


def _floor_div(a, b):
    return sympy.floor(a / b)


def _ceil_div(a, b):
    return sympy.ceiling(a / b)


def _modular_indexing(base, divisor, modulus):
    return sympy.Mod(sympy.floor(base / divisor), modulus)


# torch's integer functions and their plain-sympy meaning
_TORCH_FUNCTIONS = [
    (torch_sympy.FloorDiv, _floor_div),
    (torch_sympy.CleanDiv, _floor_div),
    (torch_sympy.CeilDiv, _ceil_div),
    (torch_sympy.IntTrueDiv, lambda a, b: a / b),
    (torch_sympy.FloatTrueDiv, lambda a, b: a / b),
    (torch_sympy.ModularIndexing, _modular_indexing),
    (torch_sympy.PythonMod, sympy.Mod),
    (torch_sympy.Mod, sympy.Mod),
    (torch_sympy.Max, sympy.Max),
    (torch_sympy.Min, sympy.Min),
    (torch_sympy.Identity, lambda a: a),
    (torch_sympy.FloorToInt, sympy.floor),
    (torch_sympy.CeilToInt, sympy.ceiling),
]


def to_standard(expr) -> sympy.Expr:
    """``expr`` (int, SymInt or sympy, possibly with torch's integer functions) as plain sympy."""
    if isinstance(expr, torch.SymInt):
        expr = expr.node.expr
    expr = sympy.sympify(expr)
    if not isinstance(expr, sympy.Basic) or expr.is_Number:
        return expr
    for torch_fn, sympy_fn in _TORCH_FUNCTIONS:
        if expr.has(torch_fn):
            expr = expr.replace(torch_fn, sympy_fn)
    return expr


def _leading(poly: sympy.Expr, symbol) -> tuple[int, sympy.Expr]:
    """(degree, leading coefficient) of a polynomial in ``symbol``; (-1, 0) for zero."""
    p = sympy.Poly(poly, symbol)
    if p.is_zero:
        return -1, sympy.Integer(0)
    return p.degree(), p.LC()


def growth_polynomial(expr, symbol=T) -> sympy.Expr:
    """A polynomial in ``symbol`` with the degree and leading coefficient of ``expr`` as
    ``symbol -> oo``. Floors, ceilings and ``Mod`` by constants are bounded perturbations, so they
    are dropped; ``Min``/``Max`` keep the argument that is smaller/larger for large ``symbol``.
    Raises ValueError for expressions that are not eventually polynomial (logs, roots)."""
    expr = sympy.sympify(expr)
    if symbol not in expr.free_symbols:
        return expr
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        return growth_polynomial(expr.args[0], symbol)
    if isinstance(expr, sympy.Mod):
        if symbol in expr.args[1].free_symbols:
            raise ValueError(f"cannot bound {expr}: modulus depends on {symbol}")
        return sympy.Integer(0)
    if isinstance(expr, (sympy.Min, sympy.Max)):
        polys = [growth_polynomial(a, symbol) for a in expr.args]
        pick = min if isinstance(expr, sympy.Min) else max
        return pick(polys, key=lambda p: _growth_key(p, symbol))
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        parts = [growth_polynomial(a, symbol) for a in expr.args]
        result = sympy.expand(expr.func(*parts))
    elif isinstance(expr, sympy.Pow) and expr.exp.is_Integer:
        result = growth_polynomial(expr.base, symbol) ** expr.exp
    else:
        result = expr
    return _polynomial_part(result, symbol, expr)


def _polynomial_part(result, symbol, original) -> sympy.Expr:
    """``result`` as a polynomial with the same growth: sizes inferred by division (reshape(-1))
    are rational functions P/Q; keep the leading behaviour LC(P)/LC(Q) * T^(deg P - deg Q)."""
    result = sympy.expand(result)
    if result.is_polynomial(symbol):
        return result
    num, den = sympy.fraction(sympy.cancel(sympy.together(result)))
    if not (num.is_polynomial(symbol) and den.is_polynomial(symbol)):
        raise ValueError(f"cost expression is not eventually polynomial in {symbol}: {original}")
    if symbol not in den.free_symbols:
        return sympy.expand(num / den)
    (dn, cn), (dd, cd) = _leading(num, symbol), _leading(den, symbol)
    return cn / cd * symbol ** (dn - dd) if dn >= dd else sympy.Integer(0)


def _growth_key(poly, symbol):
    """Sort key ordering polynomials by their value for large ``symbol``."""
    coeffs = sympy.Poly(poly, symbol).all_coeffs()
    degree = len(coeffs) - 1
    return [degree] + [float(c) for c in coeffs] if any(c != 0 for c in coeffs) else [-1]


def degree(expr, symbol=T) -> int:
    """Polynomial degree of ``expr`` in ``symbol`` as ``symbol -> oo`` (0 for constants)."""
    expr = sympy.sympify(expr)
    if symbol not in expr.free_symbols:
        return 0
    return max(_leading(growth_polynomial(expr, symbol), symbol)[0], 0)


def _dominates(big: sympy.Expr, small: sympy.Expr, symbol) -> bool:
    """True when ``big >= small`` for every ``symbol >= 0`` (all coefficients of the difference are
    non-negative); False when unknown."""
    diff = sympy.expand(big - small)
    if diff.is_Number:
        return diff >= 0
    if diff.free_symbols != {symbol} or not diff.is_polynomial(symbol):
        return False
    return all(c >= 0 for c in sympy.Poly(diff, symbol).all_coeffs())


def upper_envelope(candidates, symbol=T) -> list[sympy.Expr]:
    """The candidates not dominated by another one: their ``Max`` equals the ``Max`` of all."""
    kept: list[sympy.Expr] = []
    for cand in dict.fromkeys(sympy.expand(c) for c in candidates):
        if any(_dominates(k, cand, symbol) for k in kept):
            continue
        kept = [k for k in kept if not _dominates(cand, k, symbol)] + [cand]
    return kept


def as_int(expr, **values) -> int:
    """Integer value of ``expr`` with the symbols named in ``values`` substituted."""
    subs = {sympy.Symbol(name, integer=True, positive=True): v for name, v in values.items()}
    value = sympy.sympify(expr).subs(subs)
    if value.free_symbols:
        raise ValueError(f"expression {expr} still has free symbols {sorted(map(str, value.free_symbols))} "
                         f"after substituting {sorted(values)}")
    return int(value)
