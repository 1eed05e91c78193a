"""The package's shape: no import cycles, modules under 400 lines, functions under 80.

Read from the source with `ast`, so nothing is imported: a cycle hidden behind an import
inside a function counts too, since it only defers the circle to the first call.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'pixssl_jax'
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of the package (not the config files)."""
  modules = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    relative = path.relative_to(PACKAGE.parent)
    if relative.parts[1] == 'configs':  # The config files, loaded by path, not imported.
      continue
    parts = list(relative.with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    modules['.'.join(parts)] = path
  return modules


def _imported(tree: ast.Module, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules a module imports, at module level or inside functions."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:
        # `from pixssl_jax.data import views` names a module; `from pixssl_jax.losses import
        # WEIGHTING_FORMS` a name inside the package's `__init__`.
        submodule = f'{node.module}.{alias.name}'
        found.add(submodule if submodule in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
  return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imported(ast.parse(path.read_text()), modules) - {name}
          for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
  state = {}  # name -> 'open' while on the search path, 'done' once fully explored.
  path = []

  def visit(name):
    state[name] = 'open'
    path.append(name)
    for dep in sorted(graph[name]):
      if state.get(dep) == 'open':
        return path[path.index(dep):] + [dep]
      if dep not in state and (cycle := visit(dep)):
        return cycle
    path.pop()
    state[name] = 'done'
    return None

  for name in sorted(graph):
    if name not in state and (cycle := visit(name)):
      return cycle
  return None


def test_find_cycle_names_the_circle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert _find_cycle(graph) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_graph_sees_package_and_function_level_imports():
  graph = _graph()
  assert 'pixssl_jax.data.views' in graph['pixssl_jax.data.pipeline']
  assert 'pixssl_jax.losses' in graph['pixssl_jax.objective.registry']
  assert 'pixssl_jax.losses.uncertainty' in graph['pixssl_jax.losses']
  tree = ast.parse('def f():\n  from pixssl_jax.data import views\n')
  assert _imported(tree, _modules()) == {'pixssl_jax.data.views'}


def test_no_two_modules_import_each_other():
  cycle = _find_cycle(_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_modules_are_under_400_lines():
  long = {name: n for name, path in _modules().items()
          if (n := len(path.read_text().splitlines())) >= MAX_MODULE_LINES}
  assert not long, f'modules of {MAX_MODULE_LINES} lines or more: {long}'


def test_functions_are_under_80_lines():
  long = {}
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if (n := node.end_lineno - first + 1) >= MAX_FUNCTION_LINES:
          long[f'{name}.{node.name}'] = n
  assert not long, f'functions of {MAX_FUNCTION_LINES} lines or more: {long}'
