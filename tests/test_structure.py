"The package's structure: no import circle (module level or inside functions), the core never imports the tools, modules stay readable in size."
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]/'tps'


def _modules() -> dict:
    "`{dotted name: path}` of every module of the package (`tps.data` for tps/data/__init__.py)."
    out = {}
    for p in PKG.rglob('*.py'):
        parts = list(p.relative_to(PKG.parent).with_suffix('').parts)
        if parts[-1] == '__init__': parts = parts[:-1]
        out['.'.join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set) -> set:
    "The package modules `name` imports anywhere in its file (module level, functions, classes), resolved to modules."
    pkg = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                up = pkg.split('.')[:len(pkg.split('.')) - node.level + 1]
                base = '.'.join(up + ([base] if base else []))
            for a in node.names:                                   # `from tps.data import core` imports a module
                found.add(f'{base}.{a.name}' if f'{base}.{a.name}' in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _cycle(graph: dict):
    "One import circle as a list of modules, or None."
    state, stack = {}, []
    def visit(n):
        state[n] = 'open'; stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 'open': return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)): return c
        state[n] = 'done'; stack.pop()
        return None
    for n in sorted(graph):
        if n not in state and (c := visit(n)): return c
    return None


def test_cycle_finder_finds_a_circle():
    "The checker itself: it reports a circle made of a function-level import, and none in a chain."
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    # on the kit itself: the console entry points import the training loop only inside their functions (a fast
    # `tps --help`), and the graph still has that edge
    path = _modules()['tps.cli']
    top = {n.module for n in ast.parse(path.read_text()).body if isinstance(n, ast.ImportFrom)}
    assert not top & {'train', 'tps.train'}
    assert 'tps.train' in _imports('tps.cli', path, set(_modules()))


def test_no_import_circle():
    graph = _graph()
    assert {'tps.train', 'tps.evaluate', 'tps.runs', 'tps.data.core', 'tps.data.build'} <= set(graph)
    c = _cycle(graph)
    assert c is None, 'import circle: ' + ' -> '.join(c)


def test_core_below_its_users():
    "Training imports nothing that evaluates; the data package's core imports none of its datasets; the core never imports the tools."
    g = _graph()
    def reach(n, seen=None):
        seen = set() if seen is None else seen
        for m in g[n]:
            if m not in seen: seen.add(m); reach(m, seen)
        return seen
    assert not reach('tps.train') & {'tps.evaluate', 'tps.explorer', 'tps.experiments', 'tps.cli'}
    assert not reach('tps.data.core') & {'tps.data.cityscapes', 'tps.data.viper', 'tps.data.synthia', 'tps.data.build'}
    core = [n for n in g if not n.startswith('tps.tools') and n != 'tps.cli']
    bad = {n: sorted(m for m in reach(n) if m.startswith('tps.tools')) for n in core}
    assert not {n: v for n, v in bad.items() if v}


LIMIT = 420  # lines


def test_module_sizes():
    "No hand-written module grows past about 400 lines (the generated module index aside)."
    big = {n: len(p.read_text().splitlines()) for n, p in _modules().items() if n != 'tps._modidx'}
    assert not {n: l for n, l in big.items() if l > LIMIT}, sorted(big.items(), key=lambda x: -x[1])[:5]
