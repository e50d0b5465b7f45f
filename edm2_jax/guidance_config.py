"""Guidance configurations: a list of terms as JSON, so a result states exactly how it was guided and
can be regenerated (`experiments.generate --guidance_config=FILE.json` stores it in run.json and
summary.json).

    {"terms": [
      {"method": "insitu", "w": {"linear": {"sigmas": [0.1, 10], "values": [0.2, 0.8]}},
       "strength": 0.1, "blocks": "decoder"},
      {"method": "pag", "w": 0.3, "interval": {"sigmas": [0.5, 30]}},
      {"method": "autoguidance", "w": 0.4, "guide": "gnet", "rule": {"name": "apg", "eta": 0.0}}]}

A term: `method` (a name of `edm2_jax.methods`), `w` (the weight, EDM2's g − 1), optional `strength`
(the method's own), both a number or a schedule {"linear"|"constant": {"sigmas": [...], "values":
[...]}} (`guidance.Schedule`); `guide`: a role ("gnet") the caller resolves to a network; `blocks`
(a string or a list, `perturb.select_blocks` spellings); `window` [size, stride]; `interval`:
{"sigmas": [lo, hi]} | {"steps": [start, stop]} | {"fractions": [start, stop]} (`guidance.Interval`);
`rule`: {"name": one of `rules.BY_NAME`, its parameters by field name}. Parsing is strict: an unknown
key or a bad value is one `UserError` naming its key path (e.g. `terms[2].rule.phi`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from edm2_jax import guidance as G
from edm2_jax import methods
from edm2_jax import rules as R
from edm2_jax.errors import UserError

TERM_KEYS = ('method', 'w', 'strength', 'guide', 'blocks', 'window', 'interval', 'rule')
INTERVALS = ('sigmas', 'steps', 'fractions')
SCHEDULES = ('linear', 'constant')


# ---------------------------------------------------------------------------------------------------
# Parsing: JSON values → a checked configuration (still JSON values).

def parse(obj, source: str = 'guidance config') -> dict:
    """The configuration {"terms": [...]} checked (every key known, every value valid); a UserError
    names `source` and the key path of the first problem. Infinite σ bounds may be "inf"."""
    _keys(obj, ('terms',), source, '')
    terms = obj.get('terms')
    if not isinstance(terms, list) or not terms:
        raise UserError('needs a non-empty list of terms', where=f'{source}: terms')
    return {'terms': [_term(t, f'terms[{i}]', source) for i, t in enumerate(terms)]}


def _keys(obj, known, source, path):
    if not isinstance(obj, dict):
        raise UserError(f'must be a JSON object, got {json.dumps(obj)}', where=f'{source}: {path or "(top)"}')
    for key in obj:
        if key not in known:
            raise UserError(f'unknown key {key!r}', where=f'{source}: {path + "." if path else ""}{key}',
                            fix=f'known: {", ".join(known)}')


def _term(t, path, source):
    _keys(t, TERM_KEYS, source, path)

    def fail(key, problem, fix=None):
        return UserError(problem, where=f'{source}: {path}.{key}', fix=fix)
    if t.get('method') not in methods.NAMES or t.get('method') == 'none':
        raise fail('method', f'needs a guidance method, got {json.dumps(t.get("method"))}',
                   f'one of {", ".join(n for n in methods.NAMES if n != "none")}')
    if 'w' not in t:
        raise fail('w', 'missing (the term\'s weight, EDM2\'s g - 1)')
    out = {'method': t['method'], 'w': _value(t['w'], f'{path}.w', source)}
    if 'strength' in t:
        out['strength'] = _value(t['strength'], f'{path}.strength', source)
    if 'guide' in t:
        if not isinstance(t['guide'], str):
            raise fail('guide', f'must be a role name such as "gnet", got {json.dumps(t["guide"])}')
        out['guide'] = t['guide']
    if 'blocks' in t:
        b = t['blocks']
        if not (isinstance(b, str) or isinstance(b, list) and all(isinstance(v, str) for v in b)):
            raise fail('blocks', f'must be a string or a list of strings, got {json.dumps(b)}')
        out['blocks'] = b
    if 'window' in t:
        out['window'] = _pair(t['window'], f'{path}.window', source, integer=True)
    try:
        methods.check_arguments(methods.get(t['method']), strength=out.get('strength'), guide=out.get('guide'),
                                blocks=out.get('blocks'), window=out.get('window'))
    except ValueError as e:
        raise UserError(str(e), where=f'{source}: {path}') from None
    if 'interval' in t:
        out['interval'] = _interval(t['interval'], f'{path}.interval', source)
    if 'rule' in t:
        out['rule'] = _rule(t['rule'], f'{path}.rule', source)
    return out


def _number(v, where, inf=False, integer=False):
    if v == 'inf' and inf:
        return math.inf
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or inf and v == math.inf)
    if not ok or integer and v != int(v):
        kind = 'an integer' if integer else 'a finite number' + (' or "inf"' if inf else '')
        raise UserError(f'must be {kind}, got {json.dumps(v)}', where=where)
    return int(v) if integer else v


def _pair(v, path, source, integer=False, inf=False):
    if not isinstance(v, list) or len(v) != 2:
        raise UserError(f'must be a list of two numbers, got {json.dumps(v)}', where=f'{source}: {path}')
    return [_number(x, f'{source}: {path}[{k}]', inf=inf and k == 1, integer=integer) for k, x in enumerate(v)]


def _value(v, path, source):
    """A number, or a schedule {"linear"|"constant": {"sigmas": [...], "values": [...]}}."""
    if not isinstance(v, dict):
        return _number(v, f'{source}: {path}')
    if len(v) != 1 or next(iter(v)) not in SCHEDULES:
        raise UserError(f'a schedule has one key, "linear" or "constant"; got {sorted(v)}', where=f'{source}: {path}')
    kind, spec = next(iter(v.items()))
    _keys(spec, ('sigmas', 'values'), source, f'{path}.{kind}')
    lists = {}
    for key in ('sigmas', 'values'):
        if not isinstance(spec.get(key), list):
            raise UserError('must be a list of numbers', where=f'{source}: {path}.{kind}.{key}')
        lists[key] = [_number(x, f'{source}: {path}.{kind}.{key}[{k}]') for k, x in enumerate(spec[key])]
    try:
        getattr(G.Schedule, kind)(lists['sigmas'], lists['values'])
    except ValueError as e:
        raise UserError(str(e), where=f'{source}: {path}') from None
    return {kind: lists}


def _interval(v, path, source):
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in INTERVALS:
        raise UserError(f'must be one of {{"sigmas"|"steps"|"fractions": [a, b]}}, got {json.dumps(v)}',
                        where=f'{source}: {path}')
    kind, bounds = next(iter(v.items()))
    bounds = _pair(bounds, f'{path}.{kind}', source, integer=kind == 'steps', inf=kind == 'sigmas')
    try:
        _make_interval(kind, bounds, num_steps=None)
    except ValueError as e:
        raise UserError(str(e), where=f'{source}: {path}.{kind}') from None
    return {kind: bounds}


def _rule(v, path, source):
    if not isinstance(v, dict) or v.get('name') not in R.BY_NAME:
        raise UserError(f'needs "name", one of {", ".join(R.BY_NAME)}; got {json.dumps(v)}', where=f'{source}: {path}')
    kind = R.BY_NAME[v['name']]
    fields = {f.name: f.default for f in dataclasses.fields(kind)}
    _keys(v, ('name',) + tuple(fields), source, path)
    out = {'name': v['name']}
    for key, default in fields.items():
        if key in v:
            where = f'{path}.{key}'
            out[key] = (_pair(v[key], where, source, inf=True) if isinstance(default, tuple) else
                        _number(v[key], f'{source}: {where}'))
    try:
        _make_rule(out).check()
    except ValueError as e:
        raise UserError(str(e), where=f'{source}: {path}') from None
    return out


# ---------------------------------------------------------------------------------------------------
# Files, and the terms of a configuration.

def read(path) -> dict:
    """A configuration file, parsed (UserError naming the file for unreadable JSON or bad content)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot be read as JSON ({e})', where=str(path)) from None
    return parse(obj, str(path))


def write(path, config: dict):
    """The configuration as JSON (infinite bounds as "inf"), atomically."""
    from edm2_jax import io
    return io.write_json(path, config)


def roles(config: dict) -> set[str]:
    """The guide roles the terms refer to (e.g. {"gnet"})."""
    return {t['guide'] for t in config['terms'] if 'guide' in t}


def build(config: dict, guides: Mapping[str, Any], num_steps: int) -> tuple[G.Term, ...]:
    """The `guidance.Term`s of a parsed configuration; `guides` maps roles to networks, num_steps
    resolves "fractions" intervals."""
    missing = roles(config) - set(guides)
    if missing:
        raise UserError(f'no network for guide role(s) {", ".join(sorted(missing))}', where='guidance config')
    out = []
    for t in config['terms']:
        term = methods.term(t['method'], _weight(t['w']), _weight(t.get('strength')),
                            guide=guides[t['guide']] if 'guide' in t else None, blocks=t.get('blocks'),
                            window=None if 'window' not in t else tuple(t['window']))
        if 'interval' in t:
            (kind, bounds), = t['interval'].items()
            term = term.replace(interval=_make_interval(kind, bounds, num_steps))
        if 'rule' in t:
            term = term.replace(rule=_make_rule(t['rule']))
        out.append(term)
    return tuple(out)


def _weight(v):
    if not isinstance(v, dict):
        return v
    (kind, spec), = v.items()
    return getattr(G.Schedule, kind)(spec['sigmas'], spec['values'])


def _make_interval(kind, bounds, num_steps):
    if kind == 'sigmas':
        return G.Interval.sigmas(*bounds)
    if kind == 'steps':
        return G.Interval.steps(*bounds, num_steps=num_steps)
    return G.Interval.fractions(*bounds, num_steps=1 if num_steps is None else num_steps)


def _make_rule(spec):
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != 'name'}
    return R.BY_NAME[spec['name']](**params)
